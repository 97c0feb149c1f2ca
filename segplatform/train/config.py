"""``TrainConfig``: everything one distributed training run needs, validated on construction.

One unit of time everywhere: the *iteration*, one optimizer step (``grad_accum`` micro-batches of
``batch_size`` images on each of ``num_workers`` workers). ``max_iters``, ``warmup_iters``,
``eval_every``, ``checkpoint_every`` and ``log_every`` all count iterations. A run given
``epochs`` instead of ``max_iters`` gets ``max_iters = epochs × iterations per epoch`` when it
starts (the dataset's row count is read from its manifest).

``num_workers=0`` is Ray Train's local mode: the loop runs in the driver process with the whole
datasets (debugging, quick checks). Checkpoints are still written under ``storage_path/name``, but
nothing restarts or resumes the run and ``keep_checkpoints`` does not prune.

Placement: ``placement_strategy`` and the resources per worker (``worker_bundle()``) are checked
against the cluster's alive nodes before the run starts, and node-local ``storage_path`` /
``data`` are refused on a multi-node cluster (``segplatform.train.placement``).

Checkpoints: every evaluation writes one, scored by its ``val_miou`` (the best ``k`` are kept).
``checkpoint_every`` adds *resume-only* checkpoints between evaluations (scored below any
evaluation, so never "best"), so that a lost worker costs at most that many iterations.

Optimizer settings belong to one optimizer: ``momentum`` is SGD's, ``betas`` AdamW's. Giving the
other optimizer's setting is refused, naming the field (AdamW's beta1 is never SGD's momentum).

Secrets: ``storage_options`` may hold S3 keys. ``to_dict()`` (what MLflow params, logs and Ray's
run state see) redacts them; only ``to_dict(secrets=True)`` keeps them, for the driver's own use.

The config travels to the Ray workers as a plain dict (``to_dict`` / ``from_dict``; the secrets
travel separately, see ``segplatform.train.plan``). A ``TrainConfig`` is literal: the command
lines, job scripts, sweeps and ``recipe_config`` build one over an architecture's recipe
(``segplatform.train.recipes``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import re
from dataclasses import dataclass, field
from typing import Any

from segplatform.tracking import PROMOTION_POLICIES

OPTIMIZERS = ("sgd", "adamw")
LOSSES = ("ce", "ohem", "dice", "ce+dice")
AMP_DTYPES = ("bf16", "fp16")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
CLASS_WEIGHT_MODES = ("median_frequency",)
# ImageNet statistics on the 0..1 scale (torchvision's pretrained backbones expect them).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def default_run_name(arch: str) -> str:
    """``<arch>-<UTC timestamp>``: a new name per run (a finished name is never trained again)."""
    return f"{arch}-{_dt.datetime.now(_dt.UTC).strftime('%Y%m%d-%H%M%S')}"


@dataclass(frozen=True)
class TrainConfig:
    """One training run (see the module docstring for the units)."""

    # ---- model ---------------------------------------------------------------------------------
    arch: str = "unet"  # registry name in architectures.ARCHITECTURES
    arch_params: dict[str, Any] = field(default_factory=dict)  # config fields over the defaults
    tiny: bool = False  # start from the architecture's tiny() config instead of the paper's
    # ---- data ----------------------------------------------------------------------------------
    data: str = ""  # dataset URI: /path, file://..., s3://bucket/prefix (required by run())
    train_split: str = "train"  # split trained on
    val_split: str = "val"  # split evaluated on
    storage_options: dict[str, Any] | None = None  # S3 endpoint_url/key/secret/region (data+ckpt)
    loader_tasks: int = 2  # batches decoded + augmented ahead by Ray tasks per worker; 0: inline
    loader_task_cpus: float = 0.5  # logical CPUs of one decoding task
    # ---- augmentation (segplatform.train.transforms) --------------------------------------------
    crop_size: tuple[int, int] = (512, 512)  # training crop (H, W); padded with ignore if larger
    scale_range: tuple[float, float] = (0.5, 2.0)  # random rescale factor range (1, 1) = off
    hflip: bool = True  # random horizontal flip with probability 0.5
    color_jitter: float = 0.0  # brightness/contrast/saturation jitter strength, 0 = off
    mean: tuple[float, ...] | None = None  # normalization mean (0..1); None: ImageNet's
    std: tuple[float, ...] | None = None  # normalization std (0..1); None: ImageNet's
    # ---- optimisation --------------------------------------------------------------------------
    batch_size: int = 8  # images per worker per micro-batch
    grad_accum: int = 1  # micro-batches summed into one optimizer step
    max_iters: int | None = 1000  # optimizer steps in total (exactly one of max_iters / epochs)
    epochs: int | None = None  # passes over the train split (converted to max_iters at start)
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adamw"
    lr: float = 0.01  # base learning rate of the backbone parameters
    momentum: float | None = None  # SGD only: momentum; None = 0.9
    betas: tuple[float, float] | None = None  # AdamW only: (beta1, beta2); None = (0.9, 0.999)
    weight_decay: float = 1e-4  # L2 (SGD) / decoupled (AdamW) weight decay
    poly_power: float = 0.9  # lr × (1 - it/max_iters)^power; 0 = constant learning rate
    warmup_iters: int = 0  # linear warmup from warmup_factor × lr over these iterations
    warmup_factor: float = 0.1  # lr multiplier at iteration 0 of the warmup
    head_lr_mult: float = 1.0  # lr multiplier of parameters not under model.backbone
    grad_clip: float | None = None  # max global gradient norm; None = no clipping
    # ---- loss (segplatform.train.losses) -------------------------------------------------------
    loss: str = "ce"  # "ce", "ohem", "dice" or "ce+dice"
    class_weights: str | tuple[float, ...] | None = None  # None, "median_frequency" or K floats
    ohem_thresh: float = 0.7  # OHEM: pixels with target probability above this are easy
    ohem_min_kept: int = 100_000  # OHEM: keep at least this many pixels per batch
    dice_weight: float = 1.0  # weight of the Dice term in "ce+dice"
    border_weights: bool = False  # U-Net eq. 2 per-pixel weights (touching-object borders)
    border_w0: float = 10.0  # U-Net eq. 2 w0
    border_sigma: float = 5.0  # U-Net eq. 2 sigma (pixels)
    aux_weights: dict[str, float] | None = None  # overrides of model.loss_weights() entries
    amp: str | None = None  # autocast dtype: None (fp32), "bf16" or "fp16" (fp16: CUDA only)
    channels_last: bool | None = None  # NHWC weights and inputs; None: on with use_gpu
    # ---- cluster -------------------------------------------------------------------------------
    num_workers: int = 2  # Ray Train workers; 0 = Ray Train local mode (the loop in this process)
    use_gpu: bool = False  # one GPU per worker, NCCL, SyncBatchNorm when num_workers > 1
    cpus_per_worker: float | None = None  # None: 0.5 on CPU (CPU left to decoding), 4 with a GPU
    placement_strategy: str = "PACK"  # PACK, SPREAD, STRICT_SPREAD (one per node), STRICT_PACK
    worker_resources: dict[str, float] = field(default_factory=dict)  # extra Ray resources/worker
    check_cluster: bool = True  # refuse at once a request the alive nodes cannot hold
    shared_local_storage: bool = False  # local paths are mounted on every node (NFS): allowed
    ray_address: str | None = None  # Ray cluster to join; None: RAY_ADDRESS or a local cluster
    max_failures: int = 3  # worker-group restarts from the latest checkpoint before giving up
    storage_retries: int = 3  # resumes after the checkpoint storage was unreachable (driver side)
    # ---- storage, evaluation, checkpoints ------------------------------------------------------
    storage_path: str = "~/segplatform/runs"  # checkpoint root: local path or s3://bucket/prefix
    name: str = ""  # run name under storage_path (same name = resume); "" = <arch>-<time>
    eval_every: int | None = None  # iterations between evaluations; None: once per epoch
    checkpoint_every: int | None = None  # iterations between resume-only checkpoints; None: none
    keep_checkpoints: int = 2  # checkpoints kept, best by val_miou
    init_checkpoint: str | None = None  # checkpoint dir (path/s3://) whose weights start a new run
    eval_recipe: dict[str, Any] = field(default_factory=dict)  # InferenceRecipe fields
    eval_batch_size: int = 1  # validation images per forward pass (same-size images only)
    log_every: int = 20  # iterations between training-metric reports
    seed: int = 0  # seeds torch, numpy and random on every worker (plus the rank)
    verbose: bool = False  # Ray Train's INFO logs (worker set-up, checkpoints) in the job log
    # ---- tracking ------------------------------------------------------------------------------
    mlflow_uri: str | None = None  # MLflow tracking URI; None: MLFLOW_TRACKING_URI or no tracking
    experiment: str = "segplatform"  # MLflow experiment name
    mlflow_parent_run: str | None = None  # MLflow run id this run nests under (a sweep's)
    register_as: str | None = None  # registered model name for the best checkpoint; None: none
    register_alias: str = "champion"  # alias given to the registered version (see promote)
    promote: str = "if_better"  # move the alias: if_better (val mIoU >= holder's), always, never
    overlay_samples: int = 2  # fixed validation images logged as overlays at each evaluation
    # ---- fault injection (tests only) ----------------------------------------------------------
    fail_at_step: int | None = None  # TEST KNOB: worker fail_rank exits at this iteration, once
    fail_rank: int = 0  # TEST KNOB: the rank that exits (first attempt only, marker in storage)
    pause_at_step: int | None = None  # TEST KNOB: hold the run after this step until released, once

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        # JSON and command lines give lists; the config holds tuples.
        for name in ("crop_size", "scale_range", "mean", "std", "betas"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                set_(self, name, tuple(float(v) if name != "crop_size" else v for v in value))
        if isinstance(self.class_weights, list):
            set_(self, "class_weights", tuple(float(v) for v in self.class_weights))
        if isinstance(self.crop_size, int):
            set_(self, "crop_size", (self.crop_size, self.crop_size))
        set_(self, "arch_params", dict(self.arch_params or {}))
        set_(self, "eval_recipe", dict(self.eval_recipe or {}))
        if isinstance(self.worker_resources, dict):
            set_(self, "worker_resources", dict(self.worker_resources))
        elif self.worker_resources is None:
            set_(self, "worker_resources", {})
        if not self.name:
            set_(self, "name", default_run_name(self.arch))
        self._validate()

    # ---- validation ----------------------------------------------------------------------------

    def _validate(self) -> None:
        def fail(field_name: str, message: str) -> None:
            raise ValueError(
                f"TrainConfig.{field_name}: {message} (got {getattr(self, field_name)!r})"
            )

        def positive_int(field_name: str, *, allow_none: bool = False, minimum: int = 1) -> None:
            value = getattr(self, field_name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                fail(field_name, f"must be an int >= {minimum}")

        if not isinstance(self.arch, str) or not self.arch:
            fail("arch", "must be a registry name")
        if not isinstance(self.data, str):
            fail("data", "must be a dataset URI string")
        for name in ("train_split", "val_split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                fail(name, "must be a split name")
        positive_int("loader_tasks", minimum=0)
        if not self.loader_task_cpus > 0:
            fail("loader_task_cpus", "must be > 0")
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            fail("storage_options", "must be a dict or None")
        # augmentation
        if (
            len(self.crop_size) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in self.crop_size)
            or min(self.crop_size) < 8
        ):
            fail("crop_size", "must be two ints >= 8 (H, W)")
        low, high = (*self.scale_range, 0.0, 0.0)[:2]
        if len(self.scale_range) != 2 or not 0 < low <= high <= 8:
            fail("scale_range", "must be (low, high) with 0 < low <= high <= 8")
        if not 0 <= self.color_jitter < 1:
            fail("color_jitter", "must be in [0, 1)")
        if (self.mean is None) != (self.std is None):
            fail("mean", "mean and std must be given together")
        if self.mean is not None:
            if len(self.mean) != len(self.std) or not self.mean:
                fail("std", f"must have as many values as mean ({len(self.mean)})")
            if min(self.std) <= 0:
                fail("std", "values must be > 0")
        # optimisation
        positive_int("batch_size")
        positive_int("grad_accum")
        positive_int("max_iters", allow_none=True)
        positive_int("epochs", allow_none=True)
        if (self.max_iters is None) == (self.epochs is None):
            fail("max_iters", "give exactly one of max_iters and epochs")
        if self.optimizer not in OPTIMIZERS:
            fail("optimizer", f"must be one of {OPTIMIZERS}")
        if not self.lr > 0:
            fail("lr", "must be > 0")
        if self.momentum is not None:
            if self.optimizer != "sgd":
                fail("momentum", f"is SGD's setting; {self.optimizer} takes betas=(beta1, beta2)")
            if not 0 <= self.momentum < 1:
                fail("momentum", "must be in [0, 1)")
        if self.betas is not None:
            if self.optimizer != "adamw":
                fail("betas", f"is AdamW's setting; {self.optimizer} takes momentum")
            if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
                fail("betas", "must be two numbers in [0, 1) (beta1, beta2)")
        if self.weight_decay < 0:
            fail("weight_decay", "must be >= 0")
        if self.poly_power < 0:
            fail("poly_power", "must be >= 0")
        positive_int("warmup_iters", minimum=0)
        if not 0 < self.warmup_factor <= 1:
            fail("warmup_factor", "must be in (0, 1]")
        if not self.head_lr_mult > 0:
            fail("head_lr_mult", "must be > 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            fail("grad_clip", "must be > 0 or None")
        # loss
        if self.loss not in LOSSES:
            fail("loss", f"must be one of {LOSSES}")
        if isinstance(self.class_weights, str):
            if self.class_weights not in CLASS_WEIGHT_MODES:
                fail("class_weights", f"must be None, {CLASS_WEIGHT_MODES} or a list of floats")
        elif self.class_weights is not None and (
            not self.class_weights or min(self.class_weights) < 0
        ):
            fail("class_weights", "must be non-negative floats, one per class")
        if not 0 < self.ohem_thresh <= 1:
            fail("ohem_thresh", "must be in (0, 1]")
        positive_int("ohem_min_kept", minimum=0)
        if self.dice_weight < 0:
            fail("dice_weight", "must be >= 0")
        if self.border_w0 < 0:
            fail("border_w0", "must be >= 0")
        if not self.border_sigma > 0:
            fail("border_sigma", "must be > 0")
        if self.aux_weights is not None and (
            not isinstance(self.aux_weights, dict)
            or any(not isinstance(v, (int, float)) or v < 0 for v in self.aux_weights.values())
        ):
            fail("aux_weights", "must map output keys to weights >= 0")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            fail("amp", f"must be None or one of {AMP_DTYPES}")
        if self.amp == "fp16" and not self.use_gpu:
            fail("amp", "fp16 autocast needs use_gpu (on CPU use None or 'bf16')")
        # cluster
        positive_int("num_workers", minimum=0)
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            fail("cpus_per_worker", "must be > 0 or None")
        if self.promote not in PROMOTION_POLICIES:
            fail("promote", f"must be one of {PROMOTION_POLICIES}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            fail("placement_strategy", f"must be one of {PLACEMENT_STRATEGIES}")
        if not isinstance(self.worker_resources, dict) or any(
            not isinstance(k, str)
            or not k
            or isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not v > 0
            for k, v in self.worker_resources.items()
        ):
            fail("worker_resources", "must map Ray resource names to amounts > 0")
        if {"CPU", "GPU"} & set(self.worker_resources):
            fail("worker_resources", "CPU and GPU come from cpus_per_worker and use_gpu")
        positive_int("max_failures", minimum=0)
        positive_int("storage_retries", minimum=0)
        # storage, evaluation, checkpoints
        if not isinstance(self.storage_path, str) or not self.storage_path:
            fail("storage_path", "must be a local path or s3://bucket/prefix")
        if not _NAME_PATTERN.match(self.name):
            fail("name", "must be 1-128 characters of letters, digits, '.', '_' or '-'")
        positive_int("eval_every", allow_none=True)
        positive_int("checkpoint_every", allow_none=True)
        positive_int("keep_checkpoints")
        if self.init_checkpoint is not None and (
            not isinstance(self.init_checkpoint, str) or not self.init_checkpoint
        ):
            fail("init_checkpoint", "must be a checkpoint directory (path or s3://...) or None")
        positive_int("eval_batch_size")
        positive_int("log_every")
        positive_int("seed", minimum=0)
        positive_int("overlay_samples", minimum=0)
        positive_int("fail_at_step", allow_none=True)
        positive_int("fail_rank", minimum=0)
        if self.fail_rank >= max(self.num_workers, 1):
            fail("fail_rank", f"must be below num_workers ({self.num_workers})")
        positive_int("pause_at_step", allow_none=True)
        try:
            self.inference_recipe()
        except (TypeError, ValueError) as err:
            raise ValueError(f"TrainConfig.eval_recipe: {err}") from None
        try:
            self.model_config()
        except KeyError as err:
            raise ValueError(f"TrainConfig.arch: {err.args[0]}") from None
        except (TypeError, ValueError) as err:
            raise ValueError(f"TrainConfig.arch_params ({self.arch}): {err}") from None

    # ---- derived objects -----------------------------------------------------------------------

    def model_config(self, **extra: Any) -> Any:
        """The architecture's config object: tiny() or the paper's defaults, then arch_params."""
        import architectures

        params = {**self.arch_params, **extra}
        if self.tiny:
            cls = architectures.config_class(self.arch)
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(params) - fields)
            if unknown:
                raise TypeError(f"unknown parameter(s) {', '.join(unknown)}")
            params = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
            return cls.tiny(**params)
        return architectures.build_config(self.arch, **params)

    def inference_recipe(self) -> Any:
        """The validation ``InferenceRecipe`` (segplatform.inference)."""
        from segplatform.inference import InferenceRecipe

        return InferenceRecipe.from_dict(self.eval_recipe)

    def normalization(self, in_channels: int) -> dict[str, list[float]]:
        """Per-channel mean/std for ``in_channels`` (a grey model gets the mean of RGB stats)."""
        mean = list(self.mean if self.mean is not None else IMAGENET_MEAN)
        std = list(self.std if self.std is not None else IMAGENET_STD)
        if len(mean) == in_channels:
            return {"mean": mean, "std": std}
        if len(mean) == 1:
            return {"mean": mean * in_channels, "std": std * in_channels}
        if in_channels == 1:
            return {"mean": [sum(mean) / len(mean)], "std": [sum(std) / len(std)]}
        raise ValueError(
            f"TrainConfig.mean: {len(mean)} values for a model with {in_channels} input channels"
        )

    def resolved_momentum(self) -> float:
        """SGD momentum: explicit, else 0.9."""
        return 0.9 if self.momentum is None else float(self.momentum)

    def resolved_betas(self) -> tuple[float, float]:
        """AdamW betas: explicit, else (0.9, 0.999) (PyTorch's and the AdamW paper's)."""
        return (0.9, 0.999) if self.betas is None else (float(self.betas[0]), float(self.betas[1]))

    def optimizer_settings(self) -> str:
        """One line for logs, e.g. ``AdamW lr 0.001 betas (0.9, 0.999) weight decay 0.01``."""
        if self.optimizer == "adamw":
            head = f"AdamW lr {self.lr:.3g} betas {self.resolved_betas()}"
        else:
            head = f"SGD lr {self.lr:.3g} momentum {self.resolved_momentum()}"
        parts = [head, f"weight decay {self.weight_decay:g}"]
        parts.append(f"poly {self.poly_power:g}" if self.poly_power else "constant lr")
        if self.warmup_iters:
            parts.append(f"warmup {self.warmup_iters}")
        if self.grad_clip is not None:
            parts.append(f"clip {self.grad_clip:g}")
        return ", ".join(parts)

    def resolved_channels_last(self) -> bool:
        """NHWC memory format: explicit, else on with a GPU (tensor-core convolutions, AMP)."""
        return self.use_gpu if self.channels_last is None else bool(self.channels_last)

    def resolved_cpus_per_worker(self) -> float:
        """CPUs per worker: explicit, else 0.5 on CPU (leaving CPU to decoding), 4 with a GPU."""
        if self.cpus_per_worker is not None:
            return float(self.cpus_per_worker)
        return 4.0 if self.use_gpu else 0.5

    def worker_bundle(self) -> dict[str, float]:
        """Ray resources of one worker: CPUs, one GPU with ``use_gpu``, ``worker_resources``."""
        bundle = {"CPU": self.resolved_cpus_per_worker()}
        if self.use_gpu:
            bundle["GPU"] = 1.0
        bundle.update({name: float(amount) for name, amount in self.worker_resources.items()})
        return bundle

    # ---- serialization -------------------------------------------------------------------------

    def to_dict(self, *, secrets: bool = False) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); ``from_dict`` inverts it.

        Storage credentials are replaced by ``"***"`` unless ``secrets=True`` (see the module
        docstring): this dict is what MLflow params, logs and Ray's run state may show.
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        if not secrets:
            out["storage_options"] = redact(self.storage_options)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a dict; unknown keys raise ValueError naming them and ``source``."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a training config must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"{source}: unknown TrainConfig field(s) {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(names))}"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)


# Keys of storage options whose values are credentials (matched case-insensitively as parts).
_SECRET_PARTS = ("key", "secret", "token", "password", "credential")
REDACTED = "***"


def is_secret_option(name: str) -> bool:
    """Whether a storage option holds a credential (``key``, ``secret``, ``session_token``...)."""
    lowered = name.lower()
    return any(part in lowered for part in _SECRET_PARTS)


def redact(options: dict[str, Any] | None) -> dict[str, Any] | None:
    """``options`` with every credential value replaced by ``"***"``."""
    if options is None:
        return None
    return {k: REDACTED if is_secret_option(k) and v else v for k, v in options.items()}
