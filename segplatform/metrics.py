"""Semantic segmentation metrics from one confusion matrix accumulated over a whole dataset.

The four metrics are those of Long, Shelhamer and Darrell, "Fully Convolutional Networks for
Semantic Segmentation", CVPR 2015, §5. With ``n_ij`` the number of pixels of class ``i``
predicted as class ``j`` and ``t_i = Σ_j n_ij`` the number of pixels of class ``i``:

- pixel accuracy      ``Σ_i n_ii / Σ_i t_i``
- mean accuracy       ``(1/n_cl) Σ_i n_ii / t_i``
- mean IU             ``(1/n_cl) Σ_i n_ii / (t_i + Σ_j n_ji − n_ii)``
- frequency weighted  ``(Σ_k t_k)⁻¹ Σ_i t_i n_ii / (t_i + Σ_j n_ji − n_ii)``

One matrix is accumulated over every pixel of the dataset (metrics are never averaged per image),
pixels whose target equals ``ignore_index`` are dropped, and a class whose ratio is 0/0 is NaN and
left out of the means: a class absent from both prediction and target has NaN IoU (a class only
predicted has IoU 0 and counts), a class absent from the target has NaN accuracy. ``n_cl`` is the
number of classes with a defined value. Distributed evaluation sums the matrices of all workers
(``merge`` or ``all_reduce``) before ``compute``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ONE_CLASS_FRACTION", "ConfusionMatrix", "format_table", "one_class_everywhere"]

# Keys of the scalar metrics in ``ConfusionMatrix.compute()``, in report order.
SUMMARY_KEYS: tuple[str, ...] = ("pixel_acc", "mean_acc", "miou", "fwiou")


class ConfusionMatrix:
    """A ``(K, K)`` int64 confusion matrix, rows = target class, columns = predicted class.

    ``update`` counts on the device of its inputs (the matrix follows them), so a GPU evaluation
    loop never copies masks to the host. ``compute`` returns plain Python floats and lists.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if ignore_index is not None and (
            isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
        ):
            raise ValueError(f"ignore_index must be an int or None, got {ignore_index!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64)  # (K, K)

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"pixels={int(self.matrix.sum())})"
        )

    def reset(self) -> None:
        """Sets every count back to zero (keeps the device)."""
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Adds one batch.

        Args:
            pred: predicted labels with the target's shape (e.g. ``(N, H, W)``), or logits/scores
                ``(N, K, H, W)`` (argmax over dim 1).
            target: integer labels ``(N, H, W)``; pixels equal to ``ignore_index`` are dropped.

        Raises:
            ValueError: shapes do not match, labels are not integers, or a label lies outside
                ``[0, num_classes)`` (other than ``ignore_index`` in the target).
        """
        if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise ValueError(
                f"pred and target must be torch tensors, got {type(pred).__name__} and "
                f"{type(target).__name__}"
            )
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(f"target must hold integer labels, got dtype {target.dtype}")
        if pred.dim() == target.dim() + 1:
            if pred.shape[1] != self.num_classes:
                raise ValueError(
                    f"pred logits have {pred.shape[1]} channels in dim 1, expected "
                    f"num_classes={self.num_classes} (pred {tuple(pred.shape)}, "
                    f"target {tuple(target.shape)})"
                )
            pred = pred.argmax(dim=1)  # (N, K, H, W) -> (N, H, W)
        elif pred.is_floating_point() or pred.is_complex() or pred.dtype == torch.bool:
            raise ValueError(
                f"pred with the target's rank must hold integer labels, got dtype {pred.dtype}"
            )
        if pred.shape != target.shape:
            raise ValueError(
                f"pred labels {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape"
            )
        if pred.device != target.device:
            raise ValueError(f"pred is on {pred.device} but target is on {target.device}")

        target = target.reshape(-1).long()  # (P,)
        pred = pred.reshape(-1).long()  # (P,)
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            target = target[keep]  # (P',)
            pred = pred[keep]  # (P',)
        if target.numel() == 0:
            return
        k = self.num_classes
        # One host sync for the range check of both tensors.
        bounds = torch.stack([target.min(), target.max(), pred.min(), pred.max()]).tolist()
        if bounds[0] < 0 or bounds[1] >= k:
            bad = bounds[0] if bounds[0] < 0 else bounds[1]
            raise ValueError(
                f"target label {bad} is outside [0, {k}) and is not ignore_index="
                f"{self.ignore_index}"
            )
        if bounds[2] < 0 or bounds[3] >= k:
            bad = bounds[2] if bounds[2] < 0 else bounds[3]
            raise ValueError(f"predicted label {bad} is outside [0, {k})")
        counts = torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)  # (K, K)
        if self.matrix.device != counts.device:
            self.matrix = self.matrix.to(counts.device)
        self.matrix += counts

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Adds another matrix (e.g. a worker's) into this one and returns ``self``."""
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"can only merge a ConfusionMatrix, got {type(other).__name__}")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge ConfusionMatrix(num_classes={other.num_classes}, "
                f"ignore_index={other.ignore_index}) into ConfusionMatrix(num_classes="
                f"{self.num_classes}, ignore_index={self.ignore_index})"
            )
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def all_reduce(self, group: Any = None) -> ConfusionMatrix:
        """Sums the matrix over all ranks of ``torch.distributed`` in place; returns ``self``.

        A no-op when ``torch.distributed`` is not initialized (single process). With NCCL the sum
        runs on the current CUDA device, with other backends (gloo) on the CPU; the matrix keeps
        its device. Every rank must call it (it is a collective).
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        backend = str(dist.get_backend(group))
        if backend == "nccl":
            work_device = torch.device("cuda", torch.cuda.current_device())
        elif self.matrix.device.type == "cuda" and "nccl" in backend:
            work_device = self.matrix.device
        else:
            work_device = torch.device("cpu")
        buffer = self.matrix.to(work_device, copy=True)  # (K, K)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        self.matrix = buffer.to(self.matrix.device)
        return self

    def compute(self) -> dict[str, Any]:
        """The FCN §5 metrics of everything counted so far.

        Returns:
            ``pixel_acc``, ``mean_acc``, ``miou``, ``fwiou`` (floats) and ``iou``, ``acc``
            (lists of floats, one per class). NaN marks an undefined value (0/0): ``iou`` of a
            class absent from both prediction and target, ``acc`` of a class absent from the
            target; undefined classes are left out of ``mean_acc`` and ``miou``. With no pixel
            counted every value is NaN.
        """
        counts = self.matrix.detach().to("cpu", torch.float64)  # (K, K)
        true_positive = counts.diagonal()  # (K,)
        target_pixels = counts.sum(dim=1)  # (K,) t_i
        predicted_pixels = counts.sum(dim=0)  # (K,) Σ_j n_ji
        union = target_pixels + predicted_pixels - true_positive  # (K,)
        total = float(target_pixels.sum())
        nan = torch.tensor(math.nan, dtype=torch.float64)

        acc = torch.where(target_pixels > 0, true_positive / target_pixels, nan)  # (K,)
        iou = torch.where(union > 0, true_positive / union, nan)  # (K,)
        if total > 0:
            pixel_acc = float(true_positive.sum()) / total
            fwiou = float((target_pixels * torch.nan_to_num(iou, nan=0.0)).sum()) / total
        else:
            pixel_acc = fwiou = math.nan
        return {
            "pixel_acc": pixel_acc,
            "mean_acc": _nanmean(acc),
            "miou": _nanmean(iou),
            "fwiou": fwiou,
            "iou": [float(v) for v in iou],
            "acc": [float(v) for v in acc],
            # Fractions of the scored pixels per class, in the targets and in the predictions.
            "target_frac": [float(v) / total if total else math.nan for v in target_pixels],
            "predicted_frac": [float(v) / total if total else math.nan for v in predicted_pixels],
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``ConfusionMatrix.from_dict`` reads it back."""
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "matrix": self.matrix.detach().cpu().tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "confusion matrix") -> ConfusionMatrix:
        """Rebuilds a matrix from ``to_dict`` output; errors name ``source`` and the field."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        for field in ("num_classes", "matrix"):
            if field not in data:
                raise ValueError(f"{source}: missing field {field!r}")
        try:
            result = cls(data["num_classes"], data.get("ignore_index", 255))
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
        rows = data["matrix"]
        k = result.num_classes
        if not isinstance(rows, list) or len(rows) != k:
            raise ValueError(f"{source}: field 'matrix' must be a list of {k} rows of {k} counts")
        for row_index, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != k:
                raise ValueError(f"{source}: field 'matrix' row {row_index} must hold {k} counts")
            for value in row:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(
                        f"{source}: field 'matrix' row {row_index} holds {value!r}; counts must "
                        "be non-negative integers"
                    )
        result.matrix = torch.tensor(rows, dtype=torch.int64).reshape(k, k)  # (K, K)
        return result


# A model that gives one class to at least this fraction of the scored pixels, where the targets
# are not that uniform, predicts that class everywhere: it has not learned the task.
ONE_CLASS_FRACTION = 0.995


def one_class_everywhere(result: dict[str, Any]) -> int | None:
    """The class a model predicts everywhere (``ONE_CLASS_FRACTION`` of the scored pixels of
    ``ConfusionMatrix.compute()``'s result, while no class covers that much of the targets), or
    None when its predictions are not one class."""
    predicted, target = result.get("predicted_frac") or [], result.get("target_frac") or []
    if not predicted or not all(math.isfinite(v) for v in predicted):
        return None
    top = max(range(len(predicted)), key=predicted.__getitem__)
    if predicted[top] >= ONE_CLASS_FRACTION and max(target) < ONE_CLASS_FRACTION:
        return top
    return None


def _nanmean(values: torch.Tensor) -> float:
    defined = values[~torch.isnan(values)]
    return float(defined.mean()) if defined.numel() else math.nan


def format_table(result: dict[str, Any], class_names: list[str] | tuple[str, ...]) -> str:
    """A plain-text report of ``ConfusionMatrix.compute()``: per-class IoU and accuracy, then the
    four summary metrics. Undefined values (NaN) print as ``-``.
    """
    iou = list(result["iou"])
    acc = list(result.get("acc", [math.nan] * len(iou)))
    if len(class_names) != len(iou):
        raise ValueError(
            f"format_table: {len(class_names)} class names for {len(iou)} classes in the result"
        )
    width = max([len("class"), *(len(str(name)) for name in class_names)])

    def percent(value: float) -> str:
        return "-" if value is None or math.isnan(value) else f"{100.0 * value:.2f}"

    lines = [f"{'class':<{width}}  {'IoU %':>7}  {'Acc %':>7}"]
    lines.append("-" * len(lines[0]))
    for name, class_iou, class_acc in zip(class_names, iou, acc):
        lines.append(f"{name!s:<{width}}  {percent(class_iou):>7}  {percent(class_acc):>7}")
    lines.append("-" * len(lines[0]))
    labels = {
        "pixel_acc": "pixel accuracy",
        "mean_acc": "mean accuracy",
        "miou": "mean IoU",
        "fwiou": "freq.-weighted IoU",
    }
    for key in SUMMARY_KEYS:
        lines.append(f"{labels[key]:<{max(width, 18)}}  {percent(result[key]):>7}")
    return "\n".join(lines)
