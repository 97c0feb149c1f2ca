"""The Ray Train worker loop: plain PyTorch, with every Ray touch point marked ``# [ray]``.

``train_loop_per_worker(config_dict)`` runs in each of the ``num_workers`` processes that
``segplatform.train.run`` starts. ``config_dict`` holds ``"config"`` (``TrainConfig.to_dict()``)
and ``"plan"`` (what the driver resolved: dataset manifest, iteration counts, class weights,
tracking URI; see ``run.build_plan``).

Per iteration (one optimizer step): ``grad_accum`` micro-batches from this worker's shard of the
train split (decoded and augmented in ``TrainBatchCollate`` on Ray Data's side), forward under
``torch.autocast`` (bf16, or fp16 with a ``GradScaler`` on CUDA), ``total_loss`` over the model's
outputs, backward (gradients all-reduced by DDP on the last micro-batch only), optimizer step,
poly learning-rate step.

Every ``eval_every`` iterations and at the end: the validation split (each worker its shard) is
predicted with the configured ``InferenceRecipe`` into ONE confusion matrix per worker, summed
over all workers (``ConfusionMatrix.all_reduce``), and every ``checkpoint_every`` iterations rank
0 writes a checkpoint: the model package (``model/``, DESIGN §2.4) and ``train_state.pt``
(optimizer, scheduler, scaler, step, epoch, RNG states), reported with ``ray.train.report``.
Training metrics (every ``log_every`` iterations) go to MLflow each time, and to Ray Train at
most every ``REPORT_INTERVAL_S``: its controller collects one report per worker every 2 s, and a
report sent sooner waits for that, stalling training.

Resume: ``ray.train.get_checkpoint()`` (a restarted worker group or a resubmitted run with the
same name) restores weights and ``train_state.pt``; the step counter, learning-rate schedule and
data epoch continue (a partly consumed epoch is not replayed: training goes on with the next one).

Placement: every worker records its rank, local rank, node id, node IP and pid; rank 0 logs them at
the start of every attempt (MLflow tag ``placement``, one line such as ``2 workers on 2 nodes:
rank 0 -> 3f2a9c01d4e5/0, ...``, tag ``placement_strategy``, and the table artifact
``placement/attempt<N>.json``), and every report carries ``worker_node_ids``, ``worker_ranks``,
``worker_local_ranks`` and ``num_nodes``. At the last step every rank's parameter checksum is
gathered: ``param_checksums`` in the final metrics, ``param_checksum_rank<r>`` in MLflow.

Progress: rank 0 prints one line per metrics report (``progress_line``: step, epoch, loss, lr,
images/s, and validation mIoU where it evaluated), which reaches the driver and ``ray job logs``;
Ray Train's own INFO log of every report is raised to WARNING (``quiet_ray_report_log``).

Fault injection (tests only): ``fail_at_step`` makes rank ``fail_rank`` call ``os._exit(1)`` when
it reaches that iteration, once per run: a marker file in the run's storage directory says that
the fault already happened.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ray.data.collate_fn import NumpyBatchCollateFn
from torch import Tensor, nn

from segplatform.train.config import TrainConfig
from segplatform.train.losses import SegmentationLoss, total_loss, unet_border_weights
from segplatform.train.transforms import EvalTransform, TrainTransform

logger = logging.getLogger(__name__)

TRAIN_STATE = "train_state.pt"
MODEL_DIR = "model"
FAULT_MARKER = ".fault-injected-rank{rank}"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMMIT_TIMEOUT_S = 120.0  # how long rank 0 waits for Ray Train to commit a checkpoint
# Ray Train's controller collects reports every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s) and a
# worker's next report waits for the previous one: training-metric reports closer together than
# that would stall training, so they go to Ray at most this often (MLflow still gets every one).
REPORT_INTERVAL_S = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0")) * 1.25


# ---- data: decoding and augmentation inside Ray Data's iterator -------------------------------


class TrainBatchCollate(NumpyBatchCollateFn):
    """Decode + augment a batch of Parquet rows into tensors (runs in the data iterator).

    Returns ``image`` (N, C, h, w) float, ``mask`` (N, h, w) int64, and ``weight`` (N, h, w)
    (U-Net border weights) and ``instances`` (N, h, w) int64 when asked for.
    """

    def __init__(
        self,
        transform: TrainTransform,
        *,
        ignore_index: int,
        border: tuple[float, float] | None = None,
        instances: bool = False,
        source: str = "dataset",
    ) -> None:
        self.transform = transform
        self.ignore_index = ignore_index
        self.border = border
        self.instances = instances
        self.source = source

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Tensor]:
        from segplatform.data.format import DatasetError
        from segplatform.data.reader import decode_image, decode_mask

        images, masks, weights, instance_maps = [], [], [], []
        for index in range(len(batch["image"])):
            row = f"{self.source} row {batch['id'][index]!s}"
            instance_map = None
            if self.instances:
                raw = batch["instances"][index] if "instances" in batch else None
                instance_map = None if raw is None else decode_mask(raw)
            try:
                image = decode_image(batch["image"][index])
                mask = decode_mask(batch["mask"][index])
            except Exception as err:
                raise DatasetError(f"{row}: cannot decode ({err})") from err
            out = self.transform(image, mask, instance_map, source=row)
            images.append(out[0])
            masks.append(out[1])
            if self.instances:
                instance_maps.append(out[2] if instance_map is not None else None)
            if self.border is not None:
                w0, sigma = self.border
                weight = unet_border_weights(
                    out[1].numpy(), w0=w0, sigma=sigma, ignore_index=self.ignore_index
                )
                weights.append(torch.from_numpy(weight))
        result = {"image": torch.stack(images), "mask": torch.stack(masks)}  # (N, C, h, w)
        if weights:
            result["weight"] = torch.stack(weights)  # (N, h, w)
        if self.instances:
            # -1 marks a row without an instance map (components of the mask are used then).
            result["instances"] = torch.stack(
                [m if m is not None else torch.full_like(masks[0], -1) for m in instance_maps]
            )  # (N, h, w)
        return result


class EvalBatchCollate(NumpyBatchCollateFn):
    """Decode + normalize validation rows into lists (images may differ in size).

    ``overlay`` holds, per row, its index in ``overlay_ids`` (or -1): the fixed validation images
    drawn as overlays at each evaluation.
    """

    def __init__(
        self, transform: EvalTransform, overlay_ids: list[str], source: str = "dataset"
    ) -> None:
        self.transform = transform
        self.overlay_ids = {row_id: i for i, row_id in enumerate(overlay_ids)}
        self.source = source

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Tensor]]:
        from segplatform.data.reader import decode_image, decode_mask

        images, masks, overlay = [], [], []
        for index in range(len(batch["image"])):
            row_id = str(batch["id"][index])
            image, mask = self.transform(
                decode_image(batch["image"][index]),
                decode_mask(batch["mask"][index]),
                source=f"{self.source} row {row_id}",
            )
            images.append(image)  # (C, H, W)
            masks.append(mask)  # (H, W)
            overlay.append(torch.tensor(self.overlay_ids.get(row_id, -1)))
        return {"image": images, "mask": masks, "overlay": overlay}


# ---- optimisation pieces ------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model behind DDP."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def parameter_groups(model: nn.Module, lr: float, head_lr_mult: float) -> list[dict[str, Any]]:
    """Backbone parameters (under ``model.backbone``) at ``lr``, the rest at ``lr × mult``."""
    backbone = getattr(model, "backbone", None)
    backbone_ids = (
        {id(p) for p in backbone.parameters()} if isinstance(backbone, nn.Module) else set()
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) in backbone_ids], "lr": lr, "name": "backbone"},
        {
            "params": [p for p in trainable if id(p) not in backbone_ids],
            "lr": lr * head_lr_mult,
            "name": "head",
        },
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.lr, cfg.head_lr_mult)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay
        )
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(
    step: int, *, max_iters: int, power: float, warmup_iters: int, warmup: float
) -> float:
    """Poly schedule ``(1 - step/max_iters)^power`` times a linear warmup ramp."""
    factor = (1.0 - min(step, max_iters) / max_iters) ** power if power > 0 else 1.0
    if step < warmup_iters:
        factor *= warmup + (1.0 - warmup) * step / warmup_iters
    return factor


class PolyLR(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` with the poly + warmup factor (a class, so its state is plain numbers)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        max_iters: int,
        power: float,
        warmup_iters: int,
        warmup: float,
    ) -> None:
        self.max_iters, self.power = max_iters, power
        self.warmup_iters, self.warmup = warmup_iters, warmup
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        return lr_factor(
            step,
            max_iters=self.max_iters,
            power=self.power,
            warmup_iters=self.warmup_iters,
            warmup=self.warmup,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_epoch": self.last_epoch,
            "base_lrs": list(self.base_lrs),
            "last_lr": list(self.get_last_lr()),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_epoch = int(state_dict["last_epoch"])
        self.base_lrs = [float(v) for v in state_dict["base_lrs"]]
        lrs = [base * self._factor(self.last_epoch) for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs


# ---- RNG state (only tensors and primitive containers, for weights_only loading) --------------


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- helpers ------------------------------------------------------------------------------------


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's ``value`` (a list of one element outside torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def mean_over_workers(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return [float(v) for v in tensor.cpu()]


def parameter_checksum(model: nn.Module) -> float:
    """Sum of all parameters in float64: equal on every rank iff the replicas agree."""
    with torch.no_grad():
        total = sum(p.detach().double().sum() for p in model.parameters())
    return float(total)


def tracking_buffer_root(run_name: str, root: str | None = None) -> Path:
    """Where this node keeps MLflow records of run ``run_name`` until they are delivered.

    ``root``, else ``SEGPLATFORM_TRACKING_BUFFER``, else ``~/.cache/segplatform/tracking``.
    """
    root = root or os.environ.get("SEGPLATFORM_TRACKING_BUFFER")
    base = Path(root) if root else Path.home() / ".cache" / "segplatform" / "tracking"
    return base / run_name


def _fault_marker(plan: dict[str, Any], rank: int) -> tuple[Any, str]:
    from segplatform.data import io as dio

    fs, root = dio.resolve(plan["run_storage_uri"], plan.get("storage_options"))
    return fs, dio.join(root, FAULT_MARKER.format(rank=rank))


def maybe_inject_fault(cfg: TrainConfig, plan: dict[str, Any], rank: int, step: int) -> None:
    """TEST KNOB: exit this worker process at ``cfg.fail_at_step`` the first time only."""
    if cfg.fail_at_step is None or step != cfg.fail_at_step or rank != cfg.fail_rank:
        return
    import pyarrow.fs as pafs

    fs, marker = _fault_marker(plan, rank)
    if fs.get_file_info(marker).type != pafs.FileType.NotFound:
        return
    fs.create_dir(marker.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(marker) as stream:
        stream.write(f"fault injected at step {step}\n".encode())
    logger.warning("fault injection: rank %d exits at step %d", rank, step)
    os._exit(1)


def _persist(directory: Path, plan: dict[str, Any], dir_name: str) -> Any:
    """Copy a checkpoint directory to ``<run storage>/<dir_name>`` (Ray Train local mode)."""
    import pyarrow.fs as pafs
    import ray.train

    from segplatform.data import io as dio

    fs, root = dio.resolve(plan["run_storage_uri"], plan.get("storage_options"))
    target = dio.join(root, dir_name)
    fs.create_dir(target, recursive=True)
    pafs.copy_files(str(directory), target, destination_filesystem=fs)
    return ray.train.Checkpoint(path=target, filesystem=fs)


def _infinite_batches(shard: Any, **kwargs: Any) -> Iterator[tuple[int, Iterator[Any]]]:
    """Yield ``(epoch, batch iterator)`` forever (each call to iter_* is a new epoch)."""
    epoch = kwargs.pop("start_epoch")
    seed = kwargs.pop("seed")
    while True:
        yield (
            epoch,
            iter(shard.iter_torch_batches(local_shuffle_seed=seed + 1009 * epoch, **kwargs)),
        )
        epoch += 1


# ---- the worker loop -----------------------------------------------------------------------------


class _Trainer:
    """State of one worker; ``train_loop_per_worker`` builds and runs it."""

    def __init__(self, config_dict: dict[str, Any]) -> None:
        import ray
        import ray.train
        import ray.train.torch

        import architectures
        from segplatform.data.format import DatasetInfo
        from segplatform.metrics import ConfusionMatrix  # noqa: F401  (fail early if missing)

        self.cfg = cfg = TrainConfig.from_dict(config_dict["config"], source="train loop config")
        self.plan = plan = config_dict["plan"]
        context = ray.train.get_context()  # [ray] who am I in the worker group
        self.rank = context.get_world_rank()
        self.local_rank = context.get_local_rank()
        self.world_size = context.get_world_size()
        self.node_id = ray.get_runtime_context().get_node_id()  # [ray]
        self.device = ray.train.torch.get_device()  # [ray] cuda:<local> or cpu
        self.info = DatasetInfo.from_json(plan["dataset"], cfg.data)
        self.ignore_index = self.info.ignore_index

        self.model_config = cfg.model_config(num_classes=plan["num_classes"])
        model = architectures.build_from_config(cfg.arch, self.model_config)
        self.instance = getattr(model, "task", "semantic") == "instance"
        self.in_channels = int(getattr(self.model_config, "in_channels", 3))
        # Instance models normalize inside (torchvision's transform): they take [0, 1] pixels.
        self.normalization = (
            {"mean": [0.0] * self.in_channels, "std": [1.0] * self.in_channels}
            if self.instance
            else cfg.normalization(self.in_channels)
        )
        self.recipe = cfg.inference_recipe()
        self.loss_weights = dict(model.loss_weights())
        for key, weight in (cfg.aux_weights or {}).items():
            if key not in self.loss_weights:
                raise ValueError(
                    f"TrainConfig.aux_weights: {cfg.arch} has no output {key!r} "
                    f"(its loss terms: {sorted(self.loss_weights)})"
                )
            self.loss_weights[key] = float(weight)

        # ---- resume ---------------------------------------------------------------------------
        self.step, self.epoch, self.attempt = 0, -1, 1
        self.best_miou = float("nan")
        state: dict[str, Any] | None = None
        checkpoint = ray.train.get_checkpoint()  # [ray] latest registered checkpoint, or None
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:  # [ray] local copy of the checkpoint
                state = self._load_checkpoint(model, Path(directory))
            self.step, self.epoch = int(state["step"]), int(state["epoch"])
            self.attempt = int(state.get("attempt", 1)) + 1
            self.best_miou = float(state.get("best_miou", float("nan")))
        self.start_step = self.step
        seed_everything(cfg.seed + 1000 * self.rank + 7919 * self.step)
        if state is not None:
            rngs = state.get("rng") or []
            if len(rngs) == self.world_size:
                set_rng_state(rngs[self.rank])

        # ---- model, optimizer, schedule ---------------------------------------------------------
        if cfg.use_gpu and self.world_size > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # NHWC: convolutions run on tensor cores without layout transposes (instance models
        # take lists of images of different sizes and keep the default layout).
        self.memory_format = (
            torch.channels_last
            if cfg.resolved_channels_last() and not self.instance
            else torch.contiguous_format
        )
        model = model.to(memory_format=self.memory_format)
        self.model = ray.train.torch.prepare_model(  # [ray] to device + DDP when world_size > 1
            model,
            parallel_strategy_kwargs={"find_unused_parameters": self.instance},
        )
        self.bare = unwrap(self.model)
        self.optimizer = build_optimizer(self.bare, cfg)
        self.scheduler = PolyLR(
            self.optimizer,
            max_iters=plan["max_iters"],
            power=cfg.poly_power,
            warmup_iters=cfg.warmup_iters,
            warmup=cfg.warmup_factor,
        )
        self.amp_dtype = AMP_DTYPES.get(cfg.amp) if cfg.amp else None
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=cfg.amp == "fp16" and self.device.type == "cuda"
        )
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        class_weights = plan.get("class_weights")
        self.criterion = SegmentationLoss(
            cfg.loss,
            ignore_index=self.ignore_index,
            class_weights=(
                None
                if class_weights is None
                else torch.tensor(class_weights, dtype=torch.float32, device=self.device)
            ),
            ohem_thresh=cfg.ohem_thresh,
            ohem_min_kept=cfg.ohem_min_kept,
            dice_weight=cfg.dice_weight,
        )
        self.workers = all_gather_object(  # where every worker of this attempt runs
            {
                "rank": self.rank,
                "local_rank": self.local_rank,
                "node_id": self.node_id,
                "node_ip": ray.util.get_node_ip_address(),  # [ray]
                "pid": os.getpid(),
            }
        )
        self.tracker = self._make_tracker()
        self._log_placement()

    # ---- checkpoints --------------------------------------------------------------------------

    def _load_checkpoint(self, model: nn.Module, directory: Path) -> dict[str, Any]:
        import safetensors.torch

        from segplatform.package import WEIGHTS

        safetensors.torch.load_model(model, str(directory / MODEL_DIR / WEIGHTS), strict=False)
        return torch.load(directory / TRAIN_STATE, map_location=self.device, weights_only=True)

    def _write_checkpoint(self, directory: Path, metrics: dict[str, Any], rngs: list) -> None:
        from segplatform.package import save_package

        save_package(
            directory / MODEL_DIR,
            self.bare,
            self.cfg.arch,
            self.model_config,
            classes=self.info.classes,
            palette=self.info.palette,
            ignore_index=self.ignore_index,
            normalization=self.normalization,
            inference=self.recipe.to_dict(),
            metrics={k: v for k, v in metrics.items() if k.startswith("val_")},
            extra={
                "run_name": self.cfg.name,
                "step": self.step,
                "dataset": self.cfg.data,
                "dataset_name": self.info.name,
                "manifest_version": self.info.version,
            },
        )
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "attempt": self.attempt,
            "best_miou": self.best_miou,
            "world_size": self.world_size,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "rng": rngs,
        }
        torch.save(state, directory / TRAIN_STATE)

    # ---- tracking (rank 0 only, never blocking) ----------------------------------------------

    def _make_tracker(self) -> Any:
        from segplatform.tracking import RunTracker

        uri = self.plan.get("mlflow_uri")
        if self.rank != 0 or not uri:
            return RunTracker.disabled()
        root = self.plan.get("tracking_buffer")
        buffer = tracking_buffer_root(self.cfg.name, root) / f"worker-{uuid.uuid4().hex[:8]}"
        try:
            tracker = RunTracker(
                uri,
                self.cfg.experiment,
                self.cfg.name,
                buffer_dir=buffer,
                run_key=self.cfg.name,
                tags=self.plan.get("tags", {}),
            )
        except Exception as err:  # tracking must never stop training
            logger.warning("MLflow tracking disabled: %s", err)
            return RunTracker.disabled()
        if self.attempt == 1:
            params = {f"train.{k}": v for k, v in self.cfg.to_dict().items()}
            params.update(
                {f"model.{k}": v for k, v in _config_dict(self.model_config).items()},
            )
            params.update(
                {
                    "plan.max_iters": self.plan["max_iters"],
                    "plan.iters_per_epoch": self.plan["iters_per_epoch"],
                    "plan.total_batch": self.cfg.batch_size * self.cfg.grad_accum * self.world_size,
                    "plan.world_size": self.world_size,
                }
            )
            tracker.log_params(params)
        return tracker

    def _log_placement(self) -> None:
        """Rank 0: where this attempt's workers run (printed, MLflow tags and table)."""
        from segplatform.train.placement import placement_summary, placement_table

        if self.rank != 0:
            return
        summary = placement_summary(self.workers)
        say(f"{self.cfg.name} attempt {self.attempt}: {summary}")
        self.tracker.set_tags(
            {"placement": summary, "placement_strategy": self.cfg.placement_strategy}
        )
        self.tracker.log_table(
            placement_table(self.workers), f"attempt{self.attempt}.json", artifact_path="placement"
        )

    def _log_evaluation(
        self, result: dict[str, Any], matrix: Tensor, overlays: list[tuple[int, np.ndarray]]
    ) -> None:
        from segplatform.tracking import NullTracker

        tracker = self.tracker
        if isinstance(tracker, NullTracker):
            return
        try:
            names = list(self.info.classes)
            tracker.log_table(
                {
                    "class": names,
                    "iou": [_finite(v) for v in result["iou"]],
                    "acc": [_finite(v) for v in result["acc"]],
                },
                f"iou_step{self.step:08d}.json",
                artifact_path="eval",
            )
            tracker.log_figure(
                _confusion_figure(matrix, names), f"confusion_step{self.step:08d}.png", "eval"
            )
            for index, picture in overlays:
                tracker.log_image(
                    picture, f"step{self.step:08d}_sample{index}.png", artifact_path="overlays"
                )
        except Exception as err:  # drawing problems must not stop training
            logger.warning("could not log evaluation artifacts: %s", err)

    # ---- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, Any], Tensor, list[tuple[int, np.ndarray]]]:
        import ray.train

        from segplatform.inference import predict_probs
        from segplatform.metrics import ConfusionMatrix

        num_classes = self.plan["num_classes"]
        matrix = ConfusionMatrix(num_classes, self.ignore_index)
        transform = EvalTransform(
            in_channels=self.in_channels,
            mean=self.normalization["mean"],
            std=self.normalization["std"],
            ignore_index=self.ignore_index,
        )
        collate = EvalBatchCollate(transform, self.plan["overlay_ids"], source=self.cfg.data)
        shard = ray.train.get_dataset_shard("val")  # [ray] this worker's part of the val split
        overlays: list[tuple[int, np.ndarray]] = []
        self.bare.eval()
        # Images may differ in size, so rows are collated here into lists (iter_torch_batches
        # would concatenate them).
        for rows in shard.iter_batches(  # [ray] one pass over this worker's val shard
            batch_size=self.cfg.eval_batch_size, batch_format="numpy"
        ):
            batch = collate(rows)
            for group in _same_size_groups(batch["image"]):
                images = torch.stack([batch["image"][i] for i in group]).to(self.device)
                masks = torch.stack([batch["mask"][i] for i in group]).to(self.device)
                with torch.autocast(
                    self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
                ):
                    probs = predict_probs(self.bare, images, self.recipe, num_classes=num_classes)
                pred = probs.argmax(dim=1)  # (n, H, W)
                matrix.update(pred, masks.to(pred.device))
                for position, i in enumerate(group):
                    index = int(batch["overlay"][i])
                    if index >= 0:
                        picture = self._overlay(images[position], masks[position], pred[position])
                        overlays.append((index, picture))
        self.bare.train()
        matrix.all_reduce()  # ONE confusion matrix: the sum over all workers' shards
        gathered = all_gather_object(overlays if self.plan.get("mlflow_uri") else [])
        if self.rank == 0:
            overlays = sorted((item for part in gathered for item in part), key=lambda x: x[0])
        return matrix.compute(), matrix.matrix.cpu(), overlays

    def _overlay(self, image: Tensor, mask: Tensor, pred: Tensor) -> np.ndarray:
        """Image | ground truth | prediction, side by side (uint8 RGB, at most 256 px high)."""
        from segplatform.visualize import overlay

        mean = torch.tensor(self.normalization["mean"], device=image.device).view(-1, 1, 1)
        std = torch.tensor(self.normalization["std"], device=image.device).view(-1, 1, 1)
        pixels = ((image.float() * std + mean).clamp(0, 1) * 255).round().byte()  # (C, H, W)
        rgb = pixels.permute(1, 2, 0).cpu().numpy()
        palette = self.info.palette
        truth = overlay(rgb, mask.cpu().numpy(), palette, ignore_index=self.ignore_index)
        predicted = overlay(rgb, pred.cpu().numpy(), palette, ignore_index=self.ignore_index)
        from segplatform.visualize import as_rgb

        strip = np.concatenate([as_rgb(rgb), truth, predicted], axis=1)
        if strip.shape[0] > 256:
            from PIL import Image

            scale = 256 / strip.shape[0]
            size = (max(1, round(strip.shape[1] * scale)), 256)
            strip = np.asarray(Image.fromarray(strip).resize(size))
        return strip

    # ---- training ---------------------------------------------------------------------------

    def _loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        images = batch["image"]  # (N, C, h, w)
        if self.instance:
            from segplatform.detection import targets_from_masks

            targets = []
            for i in range(images.shape[0]):
                instances = batch["instances"][i]
                targets.append(
                    {
                        k: v.to(self.device)
                        for k, v in targets_from_masks(
                            batch["mask"][i].cpu(),
                            None if int(instances.min()) < 0 else instances.cpu(),
                            ignore_index=self.ignore_index,
                        ).items()
                    }
                )
            losses = self.model(list(images), targets)  # torchvision detection loss dict
            total = sum(self.loss_weights.get(k, 1.0) * v for k, v in losses.items())
            return total, {k: float(v.detach()) for k, v in losses.items()}
        images = images.contiguous(memory_format=self.memory_format)
        outputs = self.model(images)  # {"out": (N, K, h, w), aux...}
        return total_loss(
            outputs,
            batch["mask"],
            self.loss_weights,
            self.criterion,
            pixel_weights=batch.get("weight"),
        )

    def fit(self) -> None:
        import ray.train

        cfg, plan = self.cfg, self.plan
        max_iters = plan["max_iters"]
        accum = cfg.grad_accum
        micro_per_epoch = plan["iters_per_epoch"] * accum
        transform = TrainTransform(
            crop_size=cfg.crop_size,
            scale_range=cfg.scale_range,
            hflip=cfg.hflip,
            color_jitter=cfg.color_jitter,
            in_channels=self.in_channels,
            mean=self.normalization["mean"],
            std=self.normalization["std"],
            ignore_index=self.ignore_index,
        )
        collate = TrainBatchCollate(
            transform,
            ignore_index=self.ignore_index,
            border=(cfg.border_w0, cfg.border_sigma) if cfg.border_weights else None,
            instances=self.instance,
            source=cfg.data,
        )
        shard = ray.train.get_dataset_shard("train")  # [ray] this worker's part of the train split
        epochs = _infinite_batches(
            shard,
            start_epoch=self.epoch + 1,
            seed=cfg.seed + 31 * self.rank,
            batch_size=cfg.batch_size,
            collate_fn=collate,
            drop_last=True,  # equal batch counts on every worker (DDP needs them)
            local_shuffle_buffer_size=max(4 * cfg.batch_size, 16),
            device=self.device,
            prefetch_batches=2,
        )
        self.model.train()
        running: dict[str, float] = {}
        running_count = 0
        images_seen = 0
        window_start = time.monotonic()
        last_report = time.monotonic()
        while self.step < max_iters:
            self.epoch, batches = next(epochs)
            self.optimizer.zero_grad(set_to_none=True)
            for micro, batch in enumerate(batches):
                if micro >= micro_per_epoch:
                    continue  # an incomplete accumulation group: consume the epoch, skip it
                last_micro = (micro + 1) % accum == 0
                sync = (
                    contextlib.nullcontext()
                    if last_micro or not isinstance(self.model, nn.parallel.DistributedDataParallel)
                    else self.model.no_sync()  # gradients all-reduced on the last micro-batch
                )
                with sync:
                    with torch.autocast(
                        self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
                    ):
                        loss, terms = self._loss(batch)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"{cfg.name}: loss is {float(loss)} at step {self.step} (terms {terms})"
                        )
                    self.scaler.scale(loss / accum).backward()
                running["loss"] = running.get("loss", 0.0) + float(loss.detach())
                for key, value in terms.items():
                    running[f"loss_{key}"] = running.get(f"loss_{key}", 0.0) + value
                running_count += 1
                images_seen += batch["image"].shape[0]
                if not last_micro:
                    continue
                if cfg.grad_clip is not None:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.bare.parameters(), cfg.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.step += 1
                maybe_inject_fault(cfg, plan, self.rank, self.step)

                metrics: dict[str, Any] = {}
                report_due = False
                if self.step % cfg.log_every == 0 or self.step == max_iters:
                    keys = sorted(running)
                    means = mean_over_workers(
                        [running[k] / max(running_count, 1) for k in keys]
                        + [time.monotonic() - last_report],
                        self.device,
                    )
                    # The mean over workers: every worker takes the same decision.
                    report_due = means.pop() >= REPORT_INTERVAL_S
                    elapsed = max(time.monotonic() - window_start, 1e-9)
                    metrics.update(dict(zip(keys, means)))
                    metrics["images_per_s"] = images_seen * self.world_size / elapsed
                    running, running_count, images_seen = {}, 0, 0
                    window_start = time.monotonic()
                metrics.update(self._progress())
                if self.step % plan["eval_every"] == 0 or self.step == max_iters:
                    self._evaluate_and_report(metrics)
                    last_report = time.monotonic()
                elif "loss" in metrics:
                    self.tracker.log_metrics(metrics, step=self.step)
                    if report_due:
                        ray.train.report(metrics)  # [ray] training metrics (every worker calls it)
                        last_report = time.monotonic()
                if self.rank == 0 and ("loss" in metrics or "val_miou" in metrics):
                    say(progress_line(cfg.name, max_iters, metrics))
                if self.step >= max_iters:
                    break
        self.tracker.finish("FINISHED")

    def _progress(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "attempt": self.attempt,
            "start_step": self.start_step,
            "world_size": self.world_size,
            "worker_ranks": [w["rank"] for w in self.workers],
            "worker_local_ranks": [w["local_rank"] for w in self.workers],
            "worker_node_ids": [w["node_id"] for w in self.workers],
            "num_nodes": len({w["node_id"] for w in self.workers}),
        }

    def _evaluate_and_report(self, metrics: dict[str, Any]) -> None:
        import ray.train

        plan = self.plan
        result, matrix, overlays = self.evaluate()
        metrics.update(
            {
                "val_miou": _finite(result["miou"], 0.0),
                "val_pixel_acc": _finite(result["pixel_acc"], 0.0),
                "val_mean_acc": _finite(result["mean_acc"], 0.0),
                "val_fwiou": _finite(result["fwiou"], 0.0),
            }
        )
        for name, value in zip(self.info.classes, result["iou"]):
            metrics[f"val_iou_{_metric_name(name)}"] = _finite(value)
        if math.isnan(self.best_miou) or metrics["val_miou"] > self.best_miou:
            self.best_miou = metrics["val_miou"]
        metrics["best_val_miou"] = self.best_miou
        final = self.step >= plan["max_iters"]
        if final:
            checksums = all_gather_object(parameter_checksum(self.bare))
            metrics["param_checksums"] = checksums
            metrics["param_checksum"] = checksums[self.rank]
            # One number per rank, so that MLflow (numbers only) keeps them all.
            metrics.update({f"param_checksum_rank{r}": value for r, value in enumerate(checksums)})
        self.tracker.log_metrics(metrics, step=self.step)
        if self.rank == 0:
            self._log_evaluation(result, matrix, overlays)
        if not (final or self.step % plan["checkpoint_every"] == 0):
            ray.train.report(metrics)  # [ray] evaluation without a checkpoint
            return
        rngs = all_gather_object(rng_state())
        dir_name = f"checkpoint_step{self.step:08d}_{uuid.uuid4().hex[:6]}"
        with tempfile.TemporaryDirectory(prefix="segplatform-ckpt-") as directory:
            checkpoint = None
            if self.rank == 0:
                self._write_checkpoint(Path(directory), metrics, rngs)
                checkpoint = ray.train.Checkpoint.from_directory(directory)  # [ray]
                if plan.get("local_mode"):  # local mode keeps no checkpoint: persist it here
                    checkpoint = _persist(Path(directory), plan, dir_name)
            ray.train.report(  # [ray] metrics + checkpoint (rank 0 uploads it to storage)
                metrics, checkpoint=checkpoint, checkpoint_dir_name=dir_name
            )
        if self.rank == 0 and not plan.get("local_mode"):
            # [ray] Wait until Ray Train has committed the checkpoint, so that a failure right
            # after this point resumes from it rather than from the one before.
            try:
                ray.train.get_all_reported_checkpoints(
                    consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED,
                    timeout_s=COMMIT_TIMEOUT_S,
                )
            except Exception as err:  # the run goes on; a resume may start one checkpoint earlier
                logger.warning("checkpoint at step %d not confirmed: %s", self.step, err)


def progress_line(name: str, max_iters: int, metrics: dict[str, Any]) -> str:
    """One line of training progress for the job log, e.g. ``unet-x step 40/400 epoch 2
    loss 0.5312 lr 0.00941 25.3 img/s val mIoU 0.4123 (best 0.4123)``."""
    parts = [f"{name} step {metrics['step']}/{max_iters} epoch {metrics['epoch']}"]
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f} lr {metrics['lr']:.3g}")
        parts.append(f"{metrics['images_per_s']:.1f} img/s")
    if "val_miou" in metrics:
        parts.append(f"val mIoU {metrics['val_miou']:.4f} (best {metrics['best_val_miou']:.4f})")
    return " ".join(parts)


def say(line: str) -> None:
    """Print one line to the process's real stdout, once. (In a Ray Train worker a plain
    ``print`` goes both to the wrapped ``sys.stdout`` and, through Ray Train's patched print, to
    the console log handler: every line would show twice.)"""
    print(line, file=sys.__stdout__ or sys.stdout, flush=True)


def quiet_ray_report_log() -> None:
    """Ray Train logs every ``ray.train.report`` of every worker, the whole metrics dict, at
    INFO; rank 0's ``progress_line`` says what matters, so that log is raised to WARNING."""
    try:
        from ray.train.v2._internal.execution import context  # its logger is named by __file__

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except Exception as err:  # a private module: a newer Ray may move it
        logger.debug("Ray Train report log left as it is: %s", err)


def train_loop_per_worker(config_dict: dict[str, Any]) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker, train_loop_config=...)``)."""
    quiet_ray_report_log()
    trainer = _Trainer(config_dict)
    try:
        trainer.fit()
    except BaseException:
        trainer.tracker.finish("FAILED", timeout=10.0)
        raise


# ---- small utilities ----------------------------------------------------------------------------


def _same_size_groups(images: list[Tensor]) -> list[list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(index)
    return list(groups.values())


def _finite(value: float, default: float | None = None) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else default


def _metric_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name)


def _config_dict(config: Any) -> dict[str, Any]:
    import architectures

    return architectures.config_to_dict(config)


def _confusion_figure(matrix: Tensor, names: list[str]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    counts = matrix.double()
    rows = counts.sum(dim=1, keepdim=True).clamp(min=1)
    normalized = (counts / rows).numpy()  # row-normalized: recall per target class
    size = min(2 + 0.4 * len(names), 16)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(normalized, vmin=0, vmax=1, cmap="viridis")
    axes.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    axes.set_yticks(range(len(names)), names, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("target")
    figure.tight_layout()
    plt.close(figure)
    return figure
