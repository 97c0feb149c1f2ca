"""The learning table: every job script, as shipped, trained on the built-in real datasets.

``segplatform bench learn --all`` runs, for every architecture and every built-in dataset,

    python jobs/train_<arch>.py --data DATA --workers 2 --max-iters N --eval-every N/3 \\
        --storage OUT/runs --name learn-<arch>-<dataset> [budget flags]

as a subprocess, the way a user would: the job's own recipe (the from-scratch one, since no
``--pretrained-backbone`` is given) with only budget flags added (``--tiny``, a narrower model
through ``--arch-param``, ``--crop-size``, ``--batch-size``), never an optimizer or
learning-rate flag. ``BUDGETS`` holds, per architecture, those flags, the iteration count and a
description of the reduction, sized so that a run takes a few minutes on two CPU cores.

Per run it collects the final and best validation mIoU (the checkpoints' ``model/model.json``
metrics and the job's progress lines), the majority-class baseline of the dataset's val split
(``segplatform.quickstart.majority_miou``), the steps, the training throughput (median of the
progress lines' img/s), the wall time of the job and whether it ended cleanly (exit status 0,
every logged loss finite). For Mask R-CNN it adds the COCO mask AP (``pycocotools``,
``iouType="segm"``) of the best checkpoint on the val split, with ground-truth instances made
by the training rule (connected components per class of the semantic mask,
``segplatform.detection.targets_from_masks``).

The results go to ``OUT/learning.json`` (one record per run) and a markdown report
(``LEARNING.md`` at the repository root by default): method, machine, date, commit, the table
and the exact command lines.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BUDGETS",
    "DATASETS",
    "Budget",
    "JobLog",
    "Row",
    "checkpoint_metrics",
    "coco_mask_ap",
    "job_command",
    "learning_table",
    "mask_ap_ceiling",
    "mask_rcnn_ap",
    "parse_job_log",
    "render_markdown",
]

REPO_ROOT = Path(__file__).resolve().parents[2]

# The built-in real datasets (segplatform.data.sources), in table order.
DATASETS: tuple[str, ...] = ("mni152-tissue", "colin27-lobes")

# Workers of every run: the two CPU cores of the reference machine.
WORKERS = 2


@dataclass(frozen=True)
class Budget:
    """How one architecture is made to train in minutes on two CPU cores."""

    reduction: str  # what the flags change, in words (goes into the table)
    flags: tuple[str, ...]  # budget flags added to the job's command line
    iters: int = 300  # optimizer steps (--max-iters); evaluations at a third of it
    why: str = ""  # why this reduction and not a cheaper one (a note under the table)


# Budget flags per architecture: total batch 8 (the batch the from-scratch learning rate is
# tuned for), 128-pixel crops, and a smaller network than the paper's.
_SMALL = ("--crop-size", "128", "--batch-size", "4")
_TINY = ("--tiny", *_SMALL)
_TINY_RESNET = "tiny config (ResNet, one unit per stage, 1/4 width)"
BUDGETS: dict[str, Budget] = {
    "fcn32s": Budget("tiny config (VGG16 at 1/16 width, fc 32)", _TINY),
    "fcn16s": Budget("tiny config (VGG16 at 1/16 width, fc 32)", _TINY),
    "fcn8s": Budget("tiny config (VGG16 at 1/16 width, fc 32)", _TINY),
    "segnet": Budget(
        "tiny config at 1/8 width (VGG16 encoder-decoder, 8..64 channels)",
        ("--tiny", "--arch-param", "width_divisor=8", *_SMALL),
        why="at the tiny config's 1/16 width (4 channels in the first block) SegNet's 26 plain "
        "convolutions learn too slowly under the recipe's median-frequency class weights "
        "(background weighted 0.15): after 300 steps it labels the background grey matter "
        "(val mIoU 0.18 on mni152-tissue, the same in a plain PyTorch loop; 0.46 there without "
        "the weights). At 1/8 width it learns.",
    ),
    "unet": Budget("tiny config (4 base channels instead of 64, valid padding)", _TINY),
    "deeplab_v1": Budget("tiny config (VGG16 at 1/8 width, fc 32)", _TINY),
    "deeplab_v2": Budget(_TINY_RESNET, _TINY),
    "deeplab_v3": Budget(_TINY_RESNET, _TINY),
    "pspnet": Budget(_TINY_RESNET, _TINY),
    "refinenet": Budget(_TINY_RESNET, _TINY),
    "icnet": Budget("tiny config (one unit per stage, 1/8 of ResNet-50 width, CFF 32)", _TINY),
    "mask_rcnn": Budget(
        "tiny config (ResNet, one unit per stage, 1/4 width, FPN 32) at 128 px, 100 detections",
        (
            "--tiny",
            "--arch-param",
            "min_size=128",
            "--arch-param",
            "max_size=160",
            "--arch-param",
            "box_detections_per_img=100",
            *_SMALL,
        ),
        why="the tiny config resizes every image to 64 px, which makes most connected components "
        "sub-pixel: after 300 steps nothing is painted (val mIoU 0.158 on mni152-tissue, AP 0). "
        "At 128 px it learns a little; 100 detections per image (the paper's; tiny keeps 16) "
        "since a val slice has about 85 instances.",
    ),
}

# A run's progress line (segplatform.train.loop.progress_line).
_PROGRESS = re.compile(
    r"(?P<name>\S+) step (?P<step>\d+)/(?P<max>\d+) epoch (?P<epoch>\d+)"
    r"(?: loss (?P<loss>\S+) lr (?P<lr>\S+) (?P<ips>\S+) img/s)?"
    r"(?: val mIoU (?P<miou>\S+) \(best (?P<best>\S+)\))?"
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FINAL = re.compile(r"final val mIoU: (?P<miou>\S+)")


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return math.nan


@dataclass
class JobLog:
    """What a job's output says about its run."""

    recipe: str = ""  # the job's line naming the recipe that runs
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val mIoU)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss)
    images_per_s: list[float] = field(default_factory=list)  # one per progress line
    steps: int = 0  # last step reported
    final_miou: float | None = None  # the job's "final val mIoU" line
    stopped: str = ""  # the job's "error: ..." line, if any

    @property
    def finite(self) -> bool:
        """Every logged loss and evaluation is a finite number."""
        values = [v for _, v in self.losses] + [v for _, v in self.curve]
        return all(math.isfinite(v) for v in values)

    @property
    def median_images_per_s(self) -> float:
        values = [v for v in self.images_per_s if math.isfinite(v)]
        return statistics.median(values) if values else math.nan


def parse_job_log(text: str, name: str | None = None) -> JobLog:
    """Parse a job's output (progress lines of run ``name``, or of any run when None)."""
    log = JobLog()
    for raw in text.splitlines():
        line = _ANSI.sub("", raw)
        if line.lstrip().startswith("recipe ") and not log.recipe:
            log.recipe = line.strip()
            continue
        if line.startswith("error: "):
            log.stopped = line.strip()
            continue
        final = _FINAL.search(line)
        if final and "step" not in line:
            log.final_miou = _number(final["miou"])
            continue
        match = _PROGRESS.search(line)
        if match is None or (name is not None and match["name"] != name):
            continue
        step = int(match["step"])
        log.steps = max(log.steps, step)
        if match["loss"] is not None:
            log.losses.append((step, _number(match["loss"]) or math.nan))
            log.images_per_s.append(_number(match["ips"]) or math.nan)
        if match["miou"] is not None:
            log.curve.append((step, _number(match["miou"]) or math.nan))
    return log


def checkpoint_metrics(run_dir: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """``(step, metrics)`` of every checkpoint's model package under ``run_dir``, by step."""
    found = []
    for path in Path(run_dir).glob("checkpoint_*/model/model.json"):
        meta = json.loads(path.read_text())
        step = int((meta.get("extra") or {}).get("step", 0))
        found.append((step, dict(meta.get("metrics") or {}), path.parent))
    found.sort(key=lambda item: item[0])
    return [(step, metrics) for step, metrics, _ in found]


def best_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The model package directory with the highest ``val_miou`` under ``run_dir``."""
    best: tuple[float, Path] | None = None
    for path in Path(run_dir).glob("checkpoint_*/model/model.json"):
        miou = float((json.loads(path.read_text()).get("metrics") or {}).get("val_miou", -1.0))
        if best is None or miou > best[0]:
            best = (miou, path.parent)
    return None if best is None else best[1]


@dataclass
class Row:
    """One run of the table."""

    arch: str
    dataset: str
    reduction: str
    command: list[str]  # the job's command line (argv, program first)
    steps: int = 0
    final_miou: float = math.nan  # val mIoU at the last evaluation
    best_miou: float = math.nan  # best val mIoU over the evaluations
    curve: list[tuple[int, float]] = field(default_factory=list)
    majority_miou: float = math.nan  # val mIoU of predicting the majority class everywhere
    images_per_s: float = math.nan  # median of the progress lines
    wall_s: float = math.nan  # the job's wall time, start to exit
    load: float = math.nan  # the machine's 1-minute load average, mean of start and end
    exit_status: int | None = None
    finite: bool = False  # every logged loss finite
    recipe: str = ""  # the job's recipe line
    stopped: str = ""  # the job's error line, if it failed
    mask_ap: dict[str, float] = field(default_factory=dict)  # Mask R-CNN: COCO segm AP
    log: str = ""  # path of the job's output

    @property
    def ok(self) -> bool:
        """Ended with exit status 0 and no non-finite loss."""
        return self.exit_status == 0 and self.finite

    @property
    def ratio(self) -> float:
        """Final val mIoU over the majority baseline's."""
        if not self.majority_miou or math.isnan(self.majority_miou):
            return math.nan
        return self.final_miou / self.majority_miou

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["curve"] = [list(point) for point in self.curve]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        data = dict(data)
        data["curve"] = [(int(s), float(v)) for s, v in data.get("curve", [])]
        return cls(**data)


def run_name(arch: str, dataset: str) -> str:
    return f"learn-{arch}-{dataset}"


def job_command(
    arch: str,
    data: str,
    budget: Budget,
    storage: str,
    name: str,
    *,
    python: str = "python",
    workers: int = WORKERS,
) -> list[str]:
    """The job's command line: data, workers, iterations, evaluations, storage, name, budget."""
    return [
        python,
        f"jobs/train_{arch}.py",
        "--data",
        data,
        "--workers",
        str(workers),
        "--max-iters",
        str(budget.iters),
        "--eval-every",
        str(max(budget.iters // 3, 1)),
        "--storage",
        storage,
        "--name",
        name,
        *budget.flags,
    ]


def display_command(argv: Sequence[str]) -> str:
    """``argv`` as a shell line, the interpreter shown as ``python``."""
    return shlex.join(["python", *argv[1:]])


def run_job(
    argv: Sequence[str], log_path: Path, *, timeout: float, cwd: Path = REPO_ROOT
) -> tuple[int | None, float, str]:
    """Run a job to its end (or ``timeout`` seconds); ``(exit status, wall seconds, output)``.

    The output goes to ``log_path`` as it comes; a job past ``timeout`` is stopped (its whole
    process group) and reported with exit status None.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "w") as sink:
        process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            status: int | None = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            import signal

            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            status = None
    return status, time.monotonic() - start, log_path.read_text(errors="replace")


# ---- Mask R-CNN: COCO mask AP ----------------------------------------------------------------


def coco_mask_ap(
    ground_truth: Sequence[tuple[np.ndarray, np.ndarray]],
    predictions: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> dict[str, float]:
    """COCO mask AP (``COCOeval``, ``iouType="segm"``) of instance predictions.

    ``ground_truth[i]`` is image i's ``(labels (N,), masks (N, H, W) bool)``; ``predictions[i]``
    its ``(labels (M,), scores (M,), masks (M, H, W) bool)``. Returns ``ap`` (IoU 0.50:0.95),
    ``ap50`` and ``ap75``, averaged over the categories with ground truth; with no prediction at
    all they are 0, with no ground truth NaN.
    """
    import contextlib
    import io

    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(ground_truth) != len(predictions):
        raise ValueError(
            f"{len(ground_truth)} ground-truth images but {len(predictions)} predicted"
        )

    def encode(mask: np.ndarray) -> dict[str, Any]:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        return rle

    images, annotations, results = [], [], []
    categories: set[int] = set()
    for image_id, ((labels, masks), (p_labels, p_scores, p_masks)) in enumerate(
        zip(ground_truth, predictions, strict=True), start=1
    ):
        height, width = masks.shape[-2:] if masks.ndim == 3 else p_masks.shape[-2:]
        images.append({"id": image_id, "height": int(height), "width": int(width)})
        for label, mask in zip(labels, masks, strict=True):
            rle = encode(mask)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
            categories.add(int(label))
        for label, score, mask in zip(p_labels, p_scores, p_masks, strict=True):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(label),
                    "segmentation": encode(mask),
                    "score": float(score),
                }
            )
            categories.add(int(label))
    if not annotations:
        return {"ap": math.nan, "ap50": math.nan, "ap75": math.nan}
    if not results:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO()
        coco.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c, "name": str(c)} for c in sorted(categories)],
        }
        coco.createIndex()
        detections = coco.loadRes(results)
        evaluation = COCOeval(coco, detections, iouType="segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = [max(float(v), 0.0) for v in evaluation.stats[:3]]  # -1: no ground truth → 0
    return {"ap": stats[0], "ap50": stats[1], "ap75": stats[2]}


def mask_ap_ceiling(
    masks: Iterable[np.ndarray], *, ignore_index: int = 255, mask_size: int = 28
) -> dict[str, float]:
    """The mask AP of an oracle: every ground-truth instance detected with its own box and
    label at score 1, its mask passed through the mask head's ``mask_size``² grid (RoIAlign of
    the true mask) and pasted back as torchvision's Mask R-CNN pastes its masks. A trained model
    cannot beat it: it says what the mask resolution leaves of these instances."""
    import torch
    from torchvision.models.detection.roi_heads import paste_masks_in_image
    from torchvision.ops import roi_align

    from segplatform.detection import targets_from_masks

    ground_truth, predictions = [], []
    for mask in masks:
        targets = targets_from_masks(mask, ignore_index=ignore_index)
        labels, boxes = targets["labels"].numpy(), targets["boxes"]
        true = targets["masks"]  # (N, H, W) uint8
        ground_truth.append((labels, true.numpy() > 0))
        if len(labels) == 0:
            predictions.append((labels, np.zeros(0), true.numpy() > 0))
            continue
        rois = torch.cat([torch.arange(len(boxes), dtype=torch.float32)[:, None], boxes], dim=1)
        grid = roi_align(
            true.float()[:, None], rois, (mask_size, mask_size), 1.0, 2, aligned=True
        )  # (N, 1, mask_size, mask_size)
        pasted = paste_masks_in_image(grid, boxes, tuple(true.shape[-2:]))[:, 0]  # (N, H, W)
        predictions.append((labels, np.ones(len(labels)), (pasted > 0.5).numpy()))
    return coco_mask_ap(ground_truth, predictions)


def mask_rcnn_ap(package: str | os.PathLike, data_uri: str, split: str = "val") -> dict[str, float]:
    """COCO mask AP of a Mask R-CNN model package on ``split`` of ``data_uri``.

    Ground truth: the row's instances when stored, else connected components per class of the
    semantic mask (the training rule, ``targets_from_masks``). Predictions: every detection the
    model keeps (its ``box_score_thresh``), masks binarised at its ``mask_threshold``.
    """
    import torch

    from segplatform.data.reader import iter_samples
    from segplatform.detection import targets_from_masks
    from segplatform.package import load_package
    from segplatform.train.transforms import image_to_tensor

    model, meta = load_package(package)
    threshold = float(meta.config.get("mask_threshold", 0.5))
    mean = torch.tensor(meta.normalization["mean"])[:, None, None]
    std = torch.tensor(meta.normalization["std"])[:, None, None]
    ground_truth, predictions = [], []
    with torch.no_grad():
        for sample in iter_samples(data_uri, split):
            targets = targets_from_masks(
                sample["mask"], sample.get("instances"), ignore_index=meta.ignore_index
            )
            ground_truth.append((targets["labels"].numpy(), targets["masks"].numpy() > 0))
            image = image_to_tensor(sample["image"], meta.in_channels).float() / 255.0
            detections = model([(image - mean) / std])[0]
            masks = detections["masks"][:, 0] > threshold  # (M, H, W)
            predictions.append(
                (
                    detections["labels"].numpy(),
                    detections["scores"].numpy(),
                    masks.numpy(),
                )
            )
    return coco_mask_ap(ground_truth, predictions)


# ---- the table -------------------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine_description() -> str:
    """CPU cores, CPU model, GPU or not."""
    import torch

    from segplatform.bench.common import cpu_model

    model = cpu_model()
    gpu = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    cores = os.cpu_count() or 0
    return f"{cores} CPU cores{f' ({model})' if model else ''}, {gpu}, {platform.system()}"


def ensure_dataset(name: str, root: Path, log: Callable[[str], None] = print) -> str:
    """The built-in dataset ``name`` under ``root`` (converted once); its path."""
    from segplatform.data.sources import convert_builtin

    target = root / name
    if not (target / "dataset.json").exists():
        log(f"building {name} in {target}")
        convert_builtin(name, str(target))
    return str(target.resolve())


def run_row(
    arch: str,
    dataset: str,
    data_uri: str,
    out: Path,
    *,
    majority: float,
    budget: Budget | None = None,
    timeout: float = 1800.0,
    log: Callable[[str], None] = print,
) -> Row:
    """Train ``arch`` on ``dataset`` with its job script and budget; the table row."""
    budget = budget or BUDGETS[arch]
    name = run_name(arch, dataset)
    storage = out / "runs"
    run_dir = storage / name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the same name would resume: every row is a fresh run
    argv = job_command(arch, data_uri, budget, str(storage), name, python=sys.executable)
    log(f"$ {display_command(argv)}")
    load_start = os.getloadavg()[0]
    status, wall, output = run_job(argv, out / "logs" / f"{name}.log", timeout=timeout)
    load = (load_start + os.getloadavg()[0]) / 2
    parsed = parse_job_log(output, name)
    checkpoints = checkpoint_metrics(run_dir)
    scores = [float(m["val_miou"]) for _, m in checkpoints if "val_miou" in m]
    scores += [v for _, v in parsed.curve]
    final = parsed.final_miou
    if final is None and parsed.curve:
        final = parsed.curve[-1][1]
    row = Row(
        arch=arch,
        dataset=dataset,
        reduction=budget.reduction,
        command=[Path(argv[0]).name, *argv[1:]],
        steps=parsed.steps,
        final_miou=math.nan if final is None else float(final),
        best_miou=max(scores) if scores else math.nan,
        curve=parsed.curve,
        majority_miou=majority,
        images_per_s=parsed.median_images_per_s,
        wall_s=wall,
        load=load,
        exit_status=status,
        finite=parsed.finite,
        recipe=parsed.recipe,
        stopped=parsed.stopped,
        log=str(out / "logs" / f"{name}.log"),
    )
    if arch == "mask_rcnn" and status == 0:
        package = best_checkpoint(run_dir)
        if package is not None:
            from segplatform.data.reader import iter_samples

            row.mask_ap = mask_rcnn_ap(package, data_uri)
            ceiling = mask_ap_ceiling(s["mask"] for s in iter_samples(data_uri, "val"))
            row.mask_ap.update({f"ceiling_{k}": v for k, v in ceiling.items()})
    log(
        f"{arch} on {dataset}: {row.steps} steps, final val mIoU {row.final_miou:.4f} "
        f"(best {row.best_miou:.4f}, majority {majority:.4f}), {row.images_per_s:.1f} img/s, "
        f"{row.wall_s:.0f} s, exit {status}"
        + (f", mask AP {row.mask_ap['ap']:.4f}" if row.mask_ap else "")
    )
    return row


def _fmt(value: float, digits: int = 3) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def render_markdown(rows: Sequence[Row], meta: dict[str, Any]) -> str:
    """The LEARNING.md report of ``rows`` (``meta``: command, date, commit, machine, data, and
    ``paths``: folder -> placeholder, so that command lines name no folder of this machine)."""
    placeholders = sorted((meta.get("paths") or {}).items(), key=lambda item: -len(item[0]))

    def shown(text: str) -> str:
        for path, placeholder in placeholders:
            text = text.replace(path, placeholder)
        return text

    by_arch: dict[str, list[Row]] = {}
    for row in rows:
        by_arch.setdefault(row.arch, []).append(row)
    lines = [
        "# Learning: every job, as shipped, on the built-in real data",
        "",
        "Each row trains one job script (`jobs/train_<arch>.py`) as a user would, with its "
        "from-scratch recipe as shipped (AdamW lr 1e-3 for a total batch of 8, weight decay "
        "0.01, poly 0.9, gradient clipping 1.0, plus the job's own from-scratch overrides) and "
        "only budget flags added: `--tiny` and/or a smaller network (`--arch-param`), "
        "`--crop-size`, `--batch-size`; never an optimizer or learning-rate flag. Two Ray Train "
        "workers, validation at a third, two thirds and the end of the run.",
        "",
        f"- Machine: {meta.get('machine', '?')}. Other processes shared the cores: the load "
        "column is the machine's 1-minute load average during the run (2 = both cores busy), "
        "so images/s and wall times are lower bounds of what the machine does alone.",
        f"- Date: {meta.get('date', '?')}; git commit: {meta.get('commit', '?')}.",
        f"- Made by: `{shown(meta.get('command', 'segplatform bench learn --all'))}`",
        "- val mIoU: FCN §5 mean IU over the whole val split (one confusion matrix) at the last "
        "evaluation; best: the highest of the three evaluations. Majority: the val mIoU of "
        "predicting the most frequent class everywhere (`segplatform.quickstart.majority_miou`). "
        "Ratio: final val mIoU / majority. images/s: median of the job's progress lines "
        "(training only). Wall: the whole job, Ray start-up and evaluations included. OK: exit "
        "status 0 and every logged loss finite.",
        "",
        "| architecture | reduction used | dataset | steps | val mIoU | best | majority | ratio "
        "| images/s | wall | load | OK |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.arch} | {row.reduction} | {row.dataset} | {row.steps} | "
            f"{_fmt(row.final_miou)} | {_fmt(row.best_miou)} | {_fmt(row.majority_miou)} | "
            f"{_fmt(row.ratio, 2)} | {_fmt(row.images_per_s, 1)} | "
            f"{_fmt(row.wall_s / 60, 1)} min | {_fmt(row.load, 1)} | {'yes' if row.ok else 'no'} |"
        )
    detection = [row for row in rows if row.mask_ap]
    if detection:
        lines += [
            "",
            "## Mask R-CNN: mask AP",
            "",
            'COCO mask AP (`pycocotools` `COCOeval`, `iouType="segm"`) of the best checkpoint '
            "on the val split; ground-truth instances are the connected components (8-connected) "
            "of each class of the val masks, the rule the training uses "
            "(`segplatform.detection.targets_from_masks`). The semantic mIoU above is the "
            "training run's (detections painted by score). Ceiling: the AP of an oracle that "
            "detects every ground-truth instance with its own box and label and passes its true "
            "mask through the 28×28 mask grid (`mask_ap_ceiling`): what the mask head's "
            "resolution leaves of these instances, an upper bound for any trained model.",
            "",
            "| dataset | mask AP | AP50 | AP75 | semantic val mIoU | ceiling AP | ceiling AP50 |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in detection:
            ap = row.mask_ap
            lines.append(
                f"| {row.dataset} | {_fmt(ap.get('ap', math.nan))} | "
                f"{_fmt(ap.get('ap50', math.nan))} | {_fmt(ap.get('ap75', math.nan))} | "
                f"{_fmt(row.final_miou)} | {_fmt(ap.get('ceiling_ap', math.nan))} | "
                f"{_fmt(ap.get('ceiling_ap50', math.nan))} |"
            )
    failed = [row for row in rows if not row.ok]
    if failed:
        lines += ["", "## Runs that did not end cleanly", ""]
        for row in failed:
            why = row.stopped or f"exit status {row.exit_status}"
            lines.append(f"- {row.arch} on {row.dataset}: {why}")
    notes = list(meta.get("notes") or [])
    for arch in by_arch:
        budget = BUDGETS.get(arch)
        if budget is not None and budget.why:
            notes.append(f"- {arch}: {budget.why}")
    if notes:
        lines += ["", "## Notes", "", *notes]
    lines += [
        "",
        "## Command lines",
        "",
        "The table:",
        "",
        "```bash",
        shown(meta.get("command", "segplatform bench learn --all")),
        "```",
        "",
        "Each row (from the repository root; the datasets built with "
        "`segplatform data convert <name> DIR`):",
        "",
        "```bash",
        *(shown(display_command(row.command)) for row in rows),
        "```",
        "",
    ]
    return "\n".join(lines)


def learning_table(
    out: str | os.PathLike,
    *,
    archs: Iterable[str] | None = None,
    datasets: Iterable[str] = DATASETS,
    data_root: str | os.PathLike | None = None,
    report: str | os.PathLike | None = REPO_ROOT / "LEARNING.md",
    command: str = "segplatform bench learn --all",
    timeout: float = 1800.0,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Run every architecture on every dataset (module docstring); the rows.

    Rows are written to ``out/learning.json`` after each run and the report to ``report``.
    """
    from segplatform.data.format import read_manifest
    from segplatform.quickstart import majority_miou

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    datasets = tuple(datasets)
    root = Path(data_root).resolve() if data_root else out / "data"
    archs = list(archs or BUDGETS)
    unknown = [a for a in archs if a not in BUDGETS]
    if unknown:
        raise KeyError(f"no budget for {unknown}; known: {sorted(BUDGETS)}")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    meta = {
        "command": command,
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d"),
        "commit": (_git("rev-parse", "--short", "HEAD") or "?")
        + (" (with uncommitted changes)" if dirty else ""),
        "machine": machine_description(),
        # Shown as placeholders in the report, which must not name this machine's folders.
        "paths": {str(out): "DIR", **({} if root.is_relative_to(out) else {str(root): "DATA"})},
    }
    rows: list[Row] = []
    results = out / "learning.json"
    for dataset in datasets:
        data_uri = ensure_dataset(dataset, root, log)
        info = read_manifest(data_uri)
        majority = majority_miou(data_uri, "val", info.num_classes)
        for arch in archs:
            rows.append(
                run_row(arch, dataset, data_uri, out, majority=majority, timeout=timeout, log=log)
            )
            results.write_text(
                json.dumps({"meta": meta, "rows": [r.to_dict() for r in rows]}, indent=1)
            )
    order = {arch: i for i, arch in enumerate(BUDGETS)}
    rows.sort(key=lambda r: (order[r.arch], datasets.index(r.dataset)))
    if report is not None:
        Path(report).write_text(render_markdown(rows, meta))
        log(f"wrote {report}")
    return rows
