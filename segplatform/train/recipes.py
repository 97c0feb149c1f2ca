"""Training recipes: every architecture's settings, and the rule that turns them into a run.

This is the one home of recipe policy. ``segplatform train``, every ``jobs/train_<arch>.py``,
``segplatform sweep`` and the sweep jobs, the quickstart and Python programs
(``recipe_config``) all resolve a run here, so one architecture, dataset and set of flags trains
the same run from every entry point and prints the same recipe line.

Each architecture has two recipes (``RECIPES``, built from the data in ``PAPER`` and
``SCRATCH``):

- the paper's (fine-tuning) recipe, used when a pretrained backbone is given
  (``--pretrained-backbone URI`` or ``arch_params.pretrained_backbone``): the papers' learning
  rates assume ImageNet weights;
- the from-scratch recipe, used otherwise (nothing is downloaded, so a backbone starts random):
  AdamW with poly decay and gradient clipping, settings that converge from random
  initialisation. The papers fine-tune with SGD at small learning rates (1e-4 to 1e-2) and a 10×
  rate on new layers; from random weights those barely move.

Resolving a run (``resolve``), in order of precedence (later wins):

1. the chosen recipe (``recipe="paper"`` or ``"scratch"`` forces one);
2. the ``--tiny`` preset (``TINY_PRESET``, then the recipe's ``tiny`` adjustments);
3. what is given: a ``--config`` file, the options, ``--set`` (``arch_params`` and
   ``storage_options`` merge key by key over the recipe's);
4. the learning rate, unless given, is the recipe's scaled from the total batch it was tuned
   for to the run's (``batch_size × workers × grad_accum``): linearly for SGD (Goyal et al.,
   "Accurate, Large Minibatch SGD", arXiv:1706.02677), by the square root for AdamW (Malladi et
   al., "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms", NeurIPS 2022).

Optimizer settings are per optimizer: a recipe's SGD ``momentum`` is dropped, with a note, when
another optimizer is given (and AdamW's ``betas`` likewise for SGD); the same setting given
explicitly for the wrong optimizer is refused by ``TrainConfig``, naming the field. Every value
of the result carries where it came from (``Resolved.sources``), which ``--show-recipe`` prints.

The papers' settings and what each job's docstring says about them are in
``jobs/train_<arch>.py``; the values live here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from segplatform.train.config import TrainConfig

__all__ = [
    "OPTIMIZER_FIELDS",
    "PAPER",
    "RECIPES",
    "SCRATCH",
    "TINY_PRESET",
    "JobRecipe",
    "Resolved",
    "from_scratch",
    "merge",
    "recipe_config",
    "recipe_for",
    "resolve",
    "scaled_lr",
]

# ``--tiny``: the architecture's tiny() config and a run that finishes in seconds on a CPU.
TINY_PRESET: dict[str, Any] = {
    "tiny": True,
    "crop_size": (64, 64),
    "batch_size": 2,
    "grad_accum": 1,
    "max_iters": 2,
    "epochs": None,
    "warmup_iters": 0,
    "eval_every": None,
    "checkpoint_every": None,
    "log_every": 1,
    "keep_checkpoints": 1,
    "ohem_min_kept": 256,
    "amp": None,
}

# Each optimizer's own settings (TrainConfig refuses the other optimizer's).
OPTIMIZER_FIELDS = {"momentum": "sgd", "betas": "adamw"}

# The from-scratch recipe: what it changes in a paper recipe, and the total batch its lr is for.
SCRATCH: dict[str, Any] = {
    "settings": {
        "optimizer": "adamw",
        "lr": 1e-3,
        "momentum": None,
        "betas": None,
        "weight_decay": 0.01,
        "poly_power": 0.9,
        "warmup_iters": 0,
        "head_lr_mult": 1.0,
        "grad_clip": 1.0,
    },
    "reference_batch": 8,
}

# The papers' recipes: TrainConfig fields (batch_size per worker), the paper's total batch for
# which its lr was tuned, one line for --help, and per architecture what its from-scratch recipe
# changes beyond SCRATCH (with why) and what --tiny changes beyond TINY_PRESET.
PAPER: dict[str, dict[str, Any]] = {
    "deeplab_v1": {
        "description": "DeepLab v1: SGD lr 1e-3 (batch 20, head x10), momentum 0.9, 6000 "
        "iterations.",
        "reference_batch": 20,
        "config": {
            "crop_size": (306, 306),
            "scale_range": (1.0, 1.0),
            "batch_size": 2,
            "max_iters": 6000,
            "optimizer": "sgd",
            "lr": 0.001,
            "momentum": 0.9,
            "weight_decay": 0.0005,
            "poly_power": 0.9,
            "head_lr_mult": 10.0,
            "loss": "ce",
            "eval_recipe": {"crf": False},
        },
        # The tiny network from scratch on small crops: VGG16-BN (13 plain convolutions stall
        # from random weights), fc6 rate 2 (on the 12x12 map of a 96 px crop a rate-12 kernel
        # reads only padding off its centre), a 256-wide fc6/fc7 without dropout and no pool5a.
        # With the tiny defaults jobs/train_deeplab_v1.py --tiny on 96 px digit scenes (batch 8,
        # 400 iterations, 2 workers) predicted background everywhere (0.085); now val mIoU 0.265
        # (architectures/deeplab_v1.py, fc6_rate and backbone_norm, with the plain-loop figures).
        "tiny": {
            "arch_params": {
                "backbone_norm": True,
                "fc6_rate": 2,
                "fc_channels": 256,
                "dropout": 0.0,
                "pool5a": False,
            }
        },
    },
    "deeplab_v2": {
        "description": "DeepLab v2: poly lr 2.5e-4 (batch 10, head x10), 20K iterations, 321 "
        "crops.",
        "reference_batch": 10,
        "config": {
            "crop_size": (321, 321),
            "scale_range": (0.5, 1.5),
            "batch_size": 2,
            "max_iters": 20000,
            "optimizer": "sgd",
            "lr": 0.00025,
            "momentum": 0.9,
            "weight_decay": 0.0005,
            "poly_power": 0.9,
            "head_lr_mult": 10.0,
            "loss": "ce",
        },
    },
    "deeplab_v3": {
        "description": "DeepLab v3: poly lr 0.007 (batch 16), 30K iterations, 513 crops, OS 16.",
        "reference_batch": 16,
        "config": {
            "crop_size": (513, 513),
            "scale_range": (0.5, 2.0),
            "batch_size": 2,
            "max_iters": 30000,
            "optimizer": "sgd",
            "lr": 0.007,
            "momentum": 0.9,
            "weight_decay": 0.0001,
            "poly_power": 0.9,
            "loss": "ce",
            "arch_params": {"output_stride": 16},
        },
        # The tiny network on small crops: output stride 8 (a 96 px crop gives a 12x12 map, not
        # 6x6) and no BN in the ASPP head, which at that size stalls at the class prior and
        # predicts background everywhere (architectures/deeplab_v3.py, head_norm).
        "tiny": {"arch_params": {"output_stride": 8, "head_norm": False}},
    },
    **{
        arch: {
            "description": f"{label}: SGD lr 1e-4 (batch 20), momentum 0.9, wd 5e-4, fixed lr, "
            "whole images.",
            "reference_batch": 20,
            "config": {
                "crop_size": (512, 512),
                "scale_range": (1.0, 1.0),
                "batch_size": 2,
                "max_iters": None,
                "epochs": 50,
                "optimizer": "sgd",
                "lr": 0.0001,
                "momentum": 0.9,
                "weight_decay": 0.0005,
                "poly_power": 0.0,
                "loss": "ce",
            },
        }
        for arch, label in (("fcn32s", "FCN-32s"), ("fcn16s", "FCN-16s"), ("fcn8s", "FCN-8s"))
    },
    "icnet": {
        "description": "ICNet: poly lr 0.01 (batch 16), 30K iterations, cascade losses 0.4/0.4/1.",
        "reference_batch": 16,
        "config": {
            "crop_size": (800, 800),
            "scale_range": (0.5, 2.0),
            "batch_size": 2,
            "max_iters": 30000,
            "optimizer": "sgd",
            "lr": 0.01,
            "momentum": 0.9,
            "weight_decay": 0.0001,
            "poly_power": 0.9,
            "loss": "ce",
        },
    },
    "mask_rcnn": {
        "description": "Mask R-CNN: SGD lr 0.02 (batch 16), momentum 0.9, wd 1e-4, 160K "
        "iterations.",
        "reference_batch": 16,
        "config": {
            "crop_size": (800, 800),
            "scale_range": (1.0, 1.0),
            "batch_size": 2,
            "max_iters": 160000,
            "optimizer": "sgd",
            "lr": 0.02,
            "momentum": 0.9,
            "weight_decay": 0.0001,
            "poly_power": 0.9,
            "warmup_iters": 500,
            "warmup_factor": 0.333,
            "grad_clip": None,
        },
    },
    "pspnet": {
        "description": "PSPNet: poly lr 0.01 (batch 16, head x10), 30K iterations, 473 crops, "
        "aux 0.4.",
        "reference_batch": 16,
        "config": {
            "crop_size": (473, 473),
            "scale_range": (0.5, 2.0),
            "batch_size": 2,
            "max_iters": 30000,
            "optimizer": "sgd",
            "lr": 0.01,
            "momentum": 0.9,
            "weight_decay": 0.0001,
            "poly_power": 0.9,
            "head_lr_mult": 10.0,
            "loss": "ce",
        },
    },
    "refinenet": {
        "description": "RefineNet: SGD lr 5e-4, momentum 0.9, wd 5e-4, scale 0.7-1.3, 400 crops.",
        "reference_batch": 8,
        "config": {
            "crop_size": (400, 400),
            "scale_range": (0.7, 1.3),
            "batch_size": 1,
            "max_iters": 40000,
            "optimizer": "sgd",
            "lr": 0.0005,
            "momentum": 0.9,
            "weight_decay": 0.0005,
            "poly_power": 0.9,
            "head_lr_mult": 10.0,
            "loss": "ce",
        },
    },
    "segnet": {
        "description": "SegNet: SGD lr 0.1 (batch 12), momentum 0.9, median frequency weights.",
        "reference_batch": 12,
        "config": {
            "crop_size": (360, 480),
            "scale_range": (1.0, 1.0),
            "batch_size": 2,
            "max_iters": None,
            "epochs": 100,
            "optimizer": "sgd",
            "lr": 0.1,
            "momentum": 0.9,
            "weight_decay": 0.0005,
            "poly_power": 0.0,
            "loss": "ce",
            "class_weights": "median_frequency",
        },
    },
    "unet": {
        "description": "U-Net: SGD momentum 0.99, batch 1, border-weighted cross-entropy (eq. 2).",
        "reference_batch": 1,
        "config": {
            "crop_size": (512, 512),
            "scale_range": (0.8, 1.2),
            "batch_size": 1,
            "max_iters": 20000,
            "optimizer": "sgd",
            "lr": 0.01,
            "momentum": 0.99,
            "weight_decay": 0.0,
            "poly_power": 0.0,
            "loss": "ce",
            "border_weights": True,
            "border_w0": 10.0,
            "border_sigma": 5.0,
        },
        "scratch": {"border_weights": False},
        "scratch_description": "plain cross-entropy: eq. 2's border weights are for touching cells",
    },
}


@dataclass(frozen=True)
class JobRecipe:
    """One architecture's recipes (module docstring)."""

    config: TrainConfig  # the paper's settings, for a pretrained backbone (batch_size per worker)
    reference_batch: int  # total batch size of the paper, for which config.lr was tuned
    scratch: TrainConfig | None = None  # from-scratch settings; None: the paper's either way
    scratch_reference_batch: int = 8  # total batch for which scratch.lr was tuned
    tiny_overrides: dict[str, Any] = field(default_factory=dict)  # extra --tiny settings
    description: str = ""  # one line for --help (paper and dataset of the recipe)
    scratch_description: str = ""  # one line: what the from-scratch recipe changes and why

    def __post_init__(self) -> None:
        for name in ("reference_batch", "scratch_reference_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"JobRecipe.{name} must be >= 1, got {getattr(self, name)}")
        if self.scratch is not None and self.scratch.arch != self.config.arch:
            raise ValueError("JobRecipe.scratch must train the same architecture as config")

    def choose(
        self, pretrained: str | None, asked: str | None = None
    ) -> tuple[TrainConfig, int, str]:
        """``(recipe, reference batch, why)``: the ``asked`` one ("paper" or "scratch"), else
        the paper's with a pretrained backbone and the from-scratch one without."""
        if asked == "paper" or (asked is None and pretrained):
            if not pretrained:
                return self.config, self.reference_batch, "paper recipe (--recipe paper)"
            return (
                self.config,
                self.reference_batch,
                f"paper recipe: the backbone starts from {pretrained}",
            )
        if self.scratch is None:
            return self.config, self.reference_batch, "paper recipe (it trains from scratch)"
        if asked == "scratch":
            why = "from-scratch recipe (--recipe scratch)"
        else:
            why = "from-scratch recipe: no --pretrained-backbone given, the backbone starts random"
        if self.scratch_description:
            why += f" ({self.scratch_description})"
        return self.scratch, self.scratch_reference_batch, why


def from_scratch(paper: TrainConfig, **changes: Any) -> TrainConfig:
    """The from-scratch recipe derived from a paper recipe: ``SCRATCH``'s settings, then
    ``changes``; crop, scale range, losses and schedule length stay the paper's."""
    return paper.replace(**{**SCRATCH["settings"], **changes})


def _build(arch: str, entry: Mapping[str, Any]) -> JobRecipe:
    paper = TrainConfig(arch=arch, **entry["config"])
    return JobRecipe(
        config=paper,
        scratch=from_scratch(paper, **entry.get("scratch", {})),
        reference_batch=entry["reference_batch"],
        scratch_reference_batch=SCRATCH["reference_batch"],
        tiny_overrides=dict(entry.get("tiny", {})),
        description=entry["description"],
        scratch_description=entry.get("scratch_description", ""),
    )


RECIPES: dict[str, JobRecipe] = {arch: _build(arch, entry) for arch, entry in PAPER.items()}


def recipe_for(arch: str) -> JobRecipe:
    """The recipes of ``arch``; ValueError naming the known architectures if it has none."""
    try:
        return RECIPES[arch]
    except KeyError:
        raise ValueError(
            f"arch: no recipe for {arch!r}; architectures: {', '.join(sorted(RECIPES))}"
        ) from None


def scaled_lr(lr: float, batch_ratio: float, optimizer: str) -> float:
    """The learning rate for ``batch_ratio`` × the recipe's total batch (module docstring)."""
    return lr * (batch_ratio if optimizer == "sgd" else math.sqrt(batch_ratio))


@dataclass(frozen=True)
class Resolved:
    """A resolved run: its config, the recipe line, and where each value came from."""

    config: TrainConfig
    why: str  # which recipe runs and why ("" for a bare TrainConfig base)
    sources: dict[str, str]  # TrainConfig field -> where its value came from
    notes: list[str]  # what was dropped or may be wrong, one line each

    def line(self) -> str:
        """The recipe line every entry point prints before it trains."""
        head = f"recipe {self.config.arch}"
        return f"{head}: {self.why}; {self.config.optimizer_settings()}"

    def table(self) -> str:
        """``--show-recipe``: the recipe line, then every value that is not TrainConfig's default
        (but the architecture, named in the line), with its source."""
        values = self.config.to_dict()
        rows = [
            (name, _shown(values[name]), source)
            for name, source in self.sources.items()
            if source != "default" and name in values and name not in ("arch", "name")
        ]
        width = max((len(name) for name, _, _ in rows), default=0)
        value_width = min(max((len(value) for _, value, _ in rows), default=0), 40)
        lines = [self.line()]
        lines += [f"  {n:<{width}}  {v:<{value_width}}  {s}" for n, v, s in rows]
        return "\n".join(lines)


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def merge(
    base: TrainConfig | None,
    layers: Sequence[tuple[str, Mapping[str, Any]]],
    *,
    reference_batch: int | None = None,
    tiny_overrides: Mapping[str, Any] | None = None,
    base_label: str = "recipe",
    why: str = "",
) -> Resolved:
    """The config of ``layers`` (``(source, fields)``, later wins) over ``base`` (None:
    TrainConfig's defaults), with the precedence and lr rule of the module docstring."""
    defaults = TrainConfig().to_dict(secrets=True)
    data: dict[str, Any] = base.to_dict(secrets=True) if base is not None else dict(defaults)
    data["name"] = ""  # a recipe's name is not a run name
    sources = {
        name: base_label if base is not None and data[name] != defaults.get(name) else "default"
        for name in data
    }
    explicit: dict[str, Any] = {}
    given_from: dict[str, str] = {}
    for label, fields in layers:
        for name, value in fields.items():
            if name in ("arch_params", "storage_options") and isinstance(value, Mapping):
                value = {**(explicit.get(name) or {}), **value}
            explicit[name] = value
            given_from[name] = label
    if explicit.get("tiny"):
        for preset, label in ((TINY_PRESET, "--tiny"), (tiny_overrides or {}, "--tiny (recipe)")):
            data.update(preset)
            sources.update(dict.fromkeys(preset, label))
    if "epochs" in explicit and "max_iters" not in explicit:
        data["max_iters"] = None
        sources["max_iters"] = given_from["epochs"]
    if "max_iters" in explicit and "epochs" not in explicit:
        data["epochs"] = None
        sources["epochs"] = given_from["max_iters"]
    for name, value in explicit.items():
        if name in ("arch_params", "storage_options") and isinstance(value, Mapping):
            value = {**(data.get(name) or {}), **value}
        data[name] = value
        sources[name] = given_from[name]
    notes: list[str] = []
    optimizer = data.get("optimizer", "sgd")
    for name, owner in OPTIMIZER_FIELDS.items():
        # A recipe's setting of another optimizer is dropped; a given one is refused by
        # TrainConfig, naming the field.
        if data.get(name) is not None and owner != optimizer and name not in explicit:
            notes.append(
                f"note: the recipe's {name} {data[name]} is {owner.upper()}'s; "
                f"{optimizer} runs without it"
            )
            data[name] = None
            sources[name] = "dropped (another optimizer's)"
    if base is not None and reference_batch and "lr" not in explicit:
        if optimizer != base.optimizer:
            notes.append(
                f"note: the recipe's lr {base.lr:g} was tuned for {base.optimizer}, not "
                f"{optimizer}; give --lr"
            )
        provisional = TrainConfig.from_dict(data, source="command line")
        workers = max(provisional.num_workers, 1)  # local mode (0) is one loop
        total = provisional.batch_size * workers * provisional.grad_accum
        data["lr"] = scaled_lr(base.lr, total / reference_batch, optimizer)
        if total != reference_batch:
            rule = "linearly" if optimizer == "sgd" else "by the square root"
            sources["lr"] = (
                f"{base_label}'s {base.lr:g} for a total batch of {reference_batch}, scaled "
                f"{rule} to {total}"
            )
    config = TrainConfig.from_dict(data, source="command line")
    notes += _resolution_notes(config)
    return Resolved(config=config, why=why, sources=sources, notes=notes)


# FCN-32s scores on a stride-32 grid (one score per 32x32 cell of the crop); under 8x8 cells
# objects smaller than the stride are lost: on 96 px digit scenes (digits 22-34 px) --tiny
# predicted background everywhere (val mIoU 0.085 = the majority baseline) with the tiny
# defaults, with a BN backbone and with wider fc layers, where FCN-8s reached 0.297.
# A note, not a refusal: small fcn32s runs (tests, --tiny at 64 px) must still run.
COARSE_SCORE_GRIDS = {"fcn32s": ("FCN-32s", 32, 8)}  # arch -> (label, stride, fewest cells)


def _resolution_notes(config: TrainConfig) -> list[str]:
    """Notes on the output resolution of the resolved run: a score grid too coarse for its
    crop."""
    if config.arch not in COARSE_SCORE_GRIDS:
        return []
    label, stride, fewest = COARSE_SCORE_GRIDS[config.arch]
    height, width = config.crop_size
    rows, cols = math.ceil(height / stride), math.ceil(width / stride)
    if min(rows, cols) >= fewest:
        return []
    return [
        f"note: {label} scores on a stride-{stride} grid: a {height}x{width} crop gives "
        f"{rows}x{cols} score cells, too coarse for objects under ~{stride} px; use fcn8s (or "
        f"fcn16s), or crops of at least {stride * fewest} px"
    ]


def resolve(
    layers: Sequence[tuple[str, Mapping[str, Any]]],
    *,
    arch: str | None = None,
    recipe: str | None = None,
) -> Resolved:
    """The run of ``layers`` (``(source, fields)``, later wins) over its architecture's recipe.

    The architecture is the given ``arch`` field, else ``arch``, else TrainConfig's default; a
    pretrained backbone (``arch_params.pretrained_backbone``) picks the paper's recipe unless
    ``recipe`` ("paper" or "scratch") says which.
    """
    if recipe not in (None, "paper", "scratch"):
        raise ValueError(f"recipe: expected 'paper' or 'scratch', got {recipe!r}")
    given: dict[str, Any] = {}
    arch_params: dict[str, Any] = {}
    for _, fields in layers:
        given.update(fields)
        if isinstance(fields.get("arch_params"), Mapping):
            arch_params.update(fields["arch_params"])
    name = given.get("arch") or arch or TrainConfig().arch
    recipes = recipe_for(name)
    pretrained = arch_params.get("pretrained_backbone")
    base, reference_batch, why = recipes.choose(str(pretrained) if pretrained else None, recipe)
    label = "paper recipe" if base is recipes.config else "from-scratch recipe"
    return merge(
        base,
        layers,
        reference_batch=reference_batch,
        tiny_overrides=recipes.tiny_overrides,
        base_label=label,
        why=why,
    )


def recipe_config(arch: str, *, recipe: str | None = None, **fields: Any) -> TrainConfig:
    """The ``TrainConfig`` that ``segplatform train --arch ARCH`` with ``fields`` given would run:
    for Python programs that call ``segplatform.train.run`` (``TrainConfig(...)`` alone is the
    literal config, without any recipe).

    >>> recipe_config("deeplab_v3", data="data/mni152-tissue", num_workers=2).optimizer
    'adamw'
    """
    return resolve([("given", {"arch": arch, **fields})], arch=arch, recipe=recipe).config
