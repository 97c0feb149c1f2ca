"""Evaluation inside the training run: every validation row once, one all-reduced confusion matrix.

Worker ``r`` of ``W`` predicts the validation rows whose index ``i`` has ``i mod W == r``
(``segplatform.train.batches.eval_indices``) with the run's ``InferenceRecipe`` (whole image or
sliding window, flip, scales) into its own ``ConfusionMatrix``; the matrices are summed over the
workers (``ConfusionMatrix.all_reduce``), so the metrics are those of one pass over the whole
split, whatever the worker count (FCN §5: accumulated over the dataset, not averaged per image).

The first ``overlay_count`` validation rows are drawn at every evaluation as image | ground truth
| prediction strips with a class legend (``segplatform.visualize.comparison_grid``), and rank 0
logs them to MLflow with the per-class IoU table and the confusion-matrix figure.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from segplatform.data.shards import RowReader, SplitIndex
from segplatform.train.batches import eval_indices
from segplatform.train.distributed import all_gather_object, stop_if_any
from segplatform.train.transforms import EvalTransform

logger = logging.getLogger(__name__)

__all__ = ["Evaluator", "confusion_figure", "finite", "log_evaluation"]


def finite(value: float, default: float | None = None) -> float | None:
    """``value`` as a float, or ``default`` when it is NaN or infinite (MLflow takes no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else default


class Evaluator:
    """Scores a model on this worker's share of the validation split (module docstring)."""

    def __init__(
        self,
        rows: SplitIndex,
        *,
        info: Any,
        num_classes: int,
        in_channels: int,
        normalization: dict[str, list[float]],
        recipe: Any,
        device: torch.device,
        rank: int,
        world_size: int,
        batch_size: int = 1,
        amp_dtype: torch.dtype | None = None,
        overlay_count: int = 0,
    ) -> None:
        self.rows, self.info, self.num_classes = rows, info, num_classes
        self.ignore_index = info.ignore_index
        self.normalization, self.recipe, self.device = normalization, recipe, device
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.amp_dtype, self.overlay_count = amp_dtype, overlay_count
        self.transform = EvalTransform(
            in_channels=in_channels,
            mean=normalization["mean"],
            std=normalization["std"],
            ignore_index=self.ignore_index,
        )
        self.reader = RowReader(rows)

    def _samples(self) -> Any:
        """``(index, image (C, H, W), mask (H, W))`` of this worker's validation rows."""
        from segplatform.data.format import DatasetError
        from segplatform.data.reader import decode_image, decode_mask

        for index in eval_indices(self.rows.rows, self.rank, self.world_size):
            values = self.reader.row(index)
            name = values["name"]
            try:
                image = decode_image(values["image"])
                mask = decode_mask(values["mask"])
            except Exception as err:
                raise DatasetError(f"{name}: cannot decode ({err})") from err
            yield (index, *self.transform(image, mask, source=name))

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> tuple[dict[str, Any], Tensor, list]:
        """``(metrics, confusion matrix (K, K), overlays)``; overlays are ``(index, image,
        truth, prediction)`` numpy arrays, gathered on rank 0 (empty on the other ranks)."""
        from segplatform.inference import predict_probs
        from segplatform.metrics import ConfusionMatrix

        matrix = ConfusionMatrix(self.num_classes, self.ignore_index)
        overlays: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        was_training = model.training
        model.eval()
        pending: list[tuple[int, Tensor, Tensor]] = []

        def flush() -> None:
            # Images of one size go through the model together.
            groups: dict[tuple[int, ...], list[tuple[int, Tensor, Tensor]]] = {}
            for item in pending:
                groups.setdefault(tuple(item[1].shape), []).append(item)
            for items in groups.values():
                images = torch.stack([image for _, image, _ in items]).to(self.device)
                masks = torch.stack([mask for _, _, mask in items]).to(self.device)
                with torch.autocast(
                    self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
                ):
                    probs = predict_probs(model, images, self.recipe, num_classes=self.num_classes)
                pred = probs.argmax(dim=1)  # (n, H, W)
                matrix.update(pred, masks.to(pred.device))
                for position, (index, _, _) in enumerate(items):
                    if index < self.overlay_count:
                        overlays.append(
                            (
                                index,
                                *self._pictures(images[position], masks[position], pred[position]),
                            )
                        )
            pending.clear()

        from segplatform.data.format import DatasetError

        problem = None
        try:
            for sample in self._samples():
                pending.append(sample)
                if len(pending) >= self.batch_size:
                    flush()
            flush()
        except DatasetError as err:
            problem = f"validation: {err}"
        model.train(was_training)
        stop_if_any(problem, "bad data", self.device)
        matrix.all_reduce()  # ONE confusion matrix: the sum over all workers' rows
        gathered = all_gather_object(overlays)
        overlays = sorted((o for part in gathered for o in part), key=lambda o: o[0])
        return matrix.compute(), matrix.matrix.cpu(), overlays if self.rank == 0 else []

    def _pictures(
        self, image: Tensor, mask: Tensor, pred: Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The de-normalized image (H, W, 3) uint8, the label map and the prediction."""
        mean = torch.tensor(self.normalization["mean"], device=image.device).view(-1, 1, 1)
        std = torch.tensor(self.normalization["std"], device=image.device).view(-1, 1, 1)
        pixels = ((image.float() * std + mean).clamp(0, 1) * 255).round().byte()  # (C, H, W)
        return pixels.permute(1, 2, 0).cpu().numpy(), mask.cpu().numpy(), pred.cpu().numpy()


def confusion_figure(matrix: Tensor, names: list[str]) -> Any:
    """Row-normalized confusion matrix (recall per target class) with its values and a colour
    bar."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    counts = matrix.double()
    rows = counts.sum(dim=1, keepdim=True).clamp(min=1)
    normalized = (counts / rows).numpy()
    size = min(3 + 0.5 * len(names), 16)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    shown = axes.imshow(normalized, vmin=0, vmax=1, cmap="viridis")
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04, label="fraction of target pixels")
    if len(names) <= 20:  # the values, where they stay legible
        for i in range(len(names)):
            for j in range(len(names)):
                value = normalized[i, j]
                colour = "black" if value > 0.6 else "white"
                axes.text(j, i, f"{value:.2f}", ha="center", va="center", color=colour, fontsize=8)
    axes.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    axes.set_yticks(range(len(names)), names, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("target")
    figure.tight_layout()
    plt.close(figure)
    return figure


def log_evaluation(
    tracker: Any,
    step: int,
    info: Any,
    result: dict[str, Any],
    matrix: Tensor,
    overlays: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]],
) -> None:
    """Rank 0: the per-class IoU table, the confusion figure and the overlay strips to MLflow."""
    from segplatform.tracking import NullTracker
    from segplatform.visualize import comparison_grid

    if isinstance(tracker, NullTracker):
        return
    try:
        names = list(info.classes)
        tracker.log_table(
            {
                "class": names,
                "iou": [finite(v) for v in result["iou"]],
                "acc": [finite(v) for v in result["acc"]],
            },
            f"iou_step{step:08d}.json",
            artifact_path="eval",
        )
        tracker.log_figure(confusion_figure(matrix, names), f"confusion_step{step:08d}.png", "eval")
        for index, image, truth, pred in overlays:
            picture = comparison_grid(
                [(image, truth, pred)], names, info.palette, ignore_index=info.ignore_index
            )
            tracker.log_image(
                picture, f"step{step:08d}_sample{index}.png", artifact_path="overlays"
            )
    except Exception as err:  # drawing problems must not stop training
        logger.warning("could not log evaluation artifacts: %s", err)
