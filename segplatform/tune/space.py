"""Search spaces as data: what a sweep varies, checked against the architecture before it starts.

A space is a mapping (a JSON or YAML file, or a preset named after an architecture)::

    arch: deeplab_v3                  # optional: the architecture the space is written for
    description: atrous rates x output stride x learning rate
    params:
      atrous_rates: {choice: [[6, 12, 18], [12, 24, 36], [3, 6, 9]]}
      output_stride: {choice: [8, 16]}
      lr: {loguniform: [1.0e-4, 1.0e-2]}
      batch_size: 4                   # a plain value is fixed, not searched

Each entry of ``params`` names a field of the architecture's config (``atrous_rates``, ``bins``,
``crp_stages``, ``aux_weight``, ...) or a tunable training field (``lr``, ``weight_decay``,
``crop_size``, ``batch_size``, ...); ``model.NAME`` and ``train.NAME`` say which explicitly.
Its value is one of ``{choice: [v, ...]}``, ``{uniform: [low, high]}``, ``{loguniform: [low,
high]}``, ``{randint: [low, high]}`` (both ends included) or a plain value.

``validate`` checks every value a trial could get before any trial starts: each choice and both
ends of each range, alone and (for up to ``MAX_COMBINATIONS`` combinations of the listed values)
together, by building the trial's ``TrainConfig`` and the architecture's config from them. A
value either refuses ends in one ``SpaceError`` naming the field and what it allows (output
stride 4, an empty bins tuple, a rate of 0, an unknown field, a space for another architecture).

Tune domains (Ray Tune "Search Space API": ``tune.choice``, ``tune.uniform``,
``tune.loguniform``, ``tune.randint``, ``tune.grid_search``;
https://docs.ray.io/en/latest/tune/api/search_space.html) are built by ``param_space``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segplatform.train.config import TrainConfig

__all__ = [
    "KINDS",
    "MAX_COMBINATIONS",
    "TUNABLE_TRAIN_FIELDS",
    "Dimension",
    "SearchSpace",
    "SpaceError",
    "load_space",
]

KINDS = ("choice", "uniform", "loguniform", "randint")
# Up to this many combinations of the listed values are each checked as a whole.
MAX_COMBINATIONS = 1024
# TrainConfig fields a space may vary: optimisation, loss and augmentation settings. Data,
# storage, cluster and tracking fields are the sweep's, the same for every trial.
TUNABLE_TRAIN_FIELDS = (
    "lr",
    "weight_decay",
    "optimizer",
    "momentum",
    "betas",
    "poly_power",
    "warmup_iters",
    "warmup_factor",
    "head_lr_mult",
    "grad_clip",
    "batch_size",
    "grad_accum",
    "crop_size",
    "scale_range",
    "hflip",
    "color_jitter",
    "loss",
    "class_weights",
    "ohem_thresh",
    "ohem_min_kept",
    "dice_weight",
    "aux_weights",
    "amp",
    "seed",
)
# Model config fields the dataset or the platform decides.
_FIXED_MODEL_FIELDS = ("num_classes",)
_TOP_LEVEL_KEYS = ("arch", "description", "params")


class SpaceError(ValueError):
    """A search space that is malformed or lets a trial get a value its config refuses."""


@dataclass(frozen=True)
class Dimension:
    """One searched (or fixed) setting of a trial."""

    name: str  # the key in the space and in the results (e.g. "atrous_rates", "lr")
    target: str  # "model" (architecture config field) or "train" (TrainConfig field)
    kind: str  # "choice", "uniform", "loguniform", "randint" or "fixed"
    values: tuple[Any, ...] = ()  # choice: the values; fixed: (value,)
    low: float | None = None  # ranges: lower end (included)
    high: float | None = None  # ranges: upper end (included for randint)

    @property
    def field(self) -> str:
        """The config field it sets."""
        return self.name

    @property
    def searched(self) -> bool:
        return self.kind != "fixed"

    def candidates(self) -> tuple[Any, ...]:
        """The values ``validate`` checks: every choice, both ends of a range."""
        if self.kind in ("choice", "fixed"):
            return self.values
        if self.kind == "randint":
            return (int(self.low), int(self.high))
        return (self.low, self.high)

    def describe(self) -> str:
        """``choice of (6, 12, 18) | (12, 24, 36)``, ``loguniform 0.0001..0.01``, ``= 4``."""
        if self.kind == "fixed":
            return f"= {_show(self.values[0])}"
        if self.kind == "choice":
            return "choice of " + " | ".join(_show(v) for v in self.values)
        return f"{self.kind} {_show(self.low)}..{_show(self.high)}"

    def tune_domain(self, grid: bool) -> Any:
        """The Ray Tune domain of this dimension (``grid``: ``tune.grid_search`` of choices)."""
        from ray import tune

        if self.kind == "choice":
            values = [_plain(v) for v in self.values]
            return tune.grid_search(values) if grid else tune.choice(values)
        if grid:
            raise SpaceError(
                f"space field {self.name!r}: a {self.kind} range cannot be searched on a grid; "
                "list the values with {choice: [...]} or use --search random"
            )
        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.kind == "randint":
            return tune.randint(int(self.low), int(self.high) + 1)  # Tune excludes the upper end
        raise AssertionError(self.kind)


@dataclass(frozen=True)
class SearchSpace:
    """A parsed space (module docstring)."""

    dimensions: tuple[Dimension, ...]
    arch: str | None = None  # the architecture it was written for, if it says
    description: str = ""
    source: str = "space"  # file path or "preset NAME", for messages

    # ---- views ---------------------------------------------------------------------------------

    @property
    def searched(self) -> tuple[Dimension, ...]:
        return tuple(d for d in self.dimensions if d.searched)

    @property
    def names(self) -> tuple[str, ...]:
        """The searched settings, in the space's order (the results table's columns)."""
        return tuple(d.name for d in self.searched)

    def dimension(self, name: str) -> Dimension:
        for dim in self.dimensions:
            if dim.name == name:
                return dim
        raise KeyError(name)

    def grid_size(self) -> int:
        """Trials of a grid search: the product of the choices' counts."""
        sizes = []
        for dim in self.searched:
            if dim.kind != "choice":
                raise SpaceError(
                    f"space field {dim.name!r}: a {dim.kind} range cannot be searched on a "
                    "grid; list the values with {choice: [...]} or use --search random"
                )
            sizes.append(len(dim.values))
        return math.prod(sizes)

    def param_space(self, *, grid: bool) -> dict[str, Any]:
        """Ray Tune's ``param_space``: one domain per searched setting."""
        return {dim.name: dim.tune_domain(grid) for dim in self.searched}

    def to_dict(self) -> dict[str, Any]:
        """The space as data again (what the sweep logs and stores)."""
        params: dict[str, Any] = {}
        for dim in self.dimensions:
            key = dim.name
            if dim.kind == "fixed":
                params[key] = _plain(dim.values[0])
            elif dim.kind == "choice":
                params[key] = {"choice": [_plain(v) for v in dim.values]}
            else:
                low, high = (dim.low, dim.high)
                if dim.kind == "randint":
                    low, high = int(low), int(high)
                params[key] = {dim.kind: [low, high]}
        out: dict[str, Any] = {}
        if self.arch:
            out["arch"] = self.arch
        if self.description:
            out["description"] = self.description
        out["params"] = params
        return out

    def summary(self) -> str:
        """One line: ``atrous_rates choice of ... ; lr loguniform ...``."""
        return "; ".join(f"{d.name} {d.describe()}" for d in self.dimensions)

    # ---- applying values -----------------------------------------------------------------------

    def apply(self, base: TrainConfig, values: Mapping[str, Any], **changes: Any) -> TrainConfig:
        """``base`` with the space's fixed values, then ``values`` (searched name -> value), then
        ``changes`` (other TrainConfig fields). Raises ValueError from the configs."""
        fields: dict[str, Any] = {}
        arch_params = dict(base.arch_params)
        for dim in self.dimensions:
            if dim.kind == "fixed":
                value = dim.values[0]
            elif dim.name in values:
                value = values[dim.name]
            else:
                continue
            value = _config_value(value)
            if dim.target == "model":
                arch_params[dim.field] = value
            else:
                fields[dim.field] = value
        return base.replace(arch_params=arch_params, **fields, **changes)

    # ---- checks --------------------------------------------------------------------------------

    def validate(self, base: TrainConfig) -> None:
        """Check every value a trial could get against ``base``'s architecture (module
        docstring); ``SpaceError`` names the first field and value that fails."""
        if self.arch is not None and self.arch != base.arch:
            raise SpaceError(
                f"space field 'arch': {self.source} is a space for {self.arch}, not "
                f"{base.arch}; use --space {base.arch} or a space written for {base.arch}"
            )
        if not self.searched:
            raise SpaceError(f"{self.source}: nothing to search (every setting is fixed)")
        try:
            fixed = self.apply(base, {})
        except ValueError as err:
            dim = _culprit(self.dimensions, err)
            raise SpaceError(_refusal(dim, dim.values[0] if dim else None, base, err)) from None
        for dim in self.searched:
            for value in dim.candidates():
                try:
                    self.apply(fixed, {dim.name: value})
                except ValueError as err:
                    raise SpaceError(_refusal(dim, value, base, err)) from None
        listed = [d for d in self.searched]
        combos = math.prod(len(d.candidates()) for d in listed)
        if len(listed) > 1 and combos <= MAX_COMBINATIONS:
            for combo in itertools.product(*(d.candidates() for d in listed)):
                values = {d.name: v for d, v in zip(listed, combo)}
                try:
                    self.apply(fixed, values)
                except ValueError as err:
                    shown = ", ".join(f"{k}={_show(v)}" for k, v in values.items())
                    raise SpaceError(
                        f"space {self.source}: the combination {shown} is refused: {_reason(err)}"
                    ) from None


# ---- parsing ----------------------------------------------------------------------------------


def load_space(spec: str | Mapping[str, Any], arch: str) -> SearchSpace:
    """A space from a preset name (an architecture's name), a JSON/YAML file, or a mapping.

    Structural problems raise ``SpaceError``; the values are checked by ``SearchSpace.validate``.
    """
    from segplatform.tune.presets import PRESETS

    if isinstance(spec, Mapping):
        return parse_space(spec, source="space", arch=arch)
    text = str(spec)
    path = Path(text).expanduser()
    if text in PRESETS and not path.is_file():
        return parse_space(PRESETS[text], source=f"preset {text}", arch=arch)
    if not path.is_file():
        raise SpaceError(
            f"--space {text!r}: neither a file nor a preset (presets: {', '.join(PRESETS)})"
        )
    raw = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(raw)
        else:
            import yaml

            data = yaml.safe_load(raw)
    except Exception as err:  # JSON or YAML syntax
        raise SpaceError(f"{path}: not a valid {path.suffix or 'YAML'} file: {err}") from None
    if not isinstance(data, Mapping):
        raise SpaceError(f"{path}: a space is a mapping with 'params' (see --help)")
    return parse_space(data, source=str(path), arch=arch)


def parse_space(data: Mapping[str, Any], *, source: str, arch: str) -> SearchSpace:
    """A ``SearchSpace`` from its data form, fields resolved against architecture ``arch``."""
    unknown = sorted(set(data) - set(_TOP_LEVEL_KEYS))
    if unknown:
        raise SpaceError(
            f"{source}: unknown key(s) {', '.join(unknown)}; a space has "
            f"{', '.join(_TOP_LEVEL_KEYS)}"
        )
    params = data.get("params")
    if not isinstance(params, Mapping) or not params:
        raise SpaceError(f"{source}: 'params' must map setting names to values or domains")
    space_arch = data.get("arch")
    if space_arch is not None and not isinstance(space_arch, str):
        raise SpaceError(f"{source}: 'arch' must be an architecture name")
    # Field names resolve against the architecture the space is written for, if it says.
    model_fields = _model_fields(space_arch or arch)
    dims = []
    seen: dict[str, str] = {}
    for key, value in params.items():
        target, name = _resolve(str(key), model_fields, space_arch or arch, source)
        if name in seen:
            raise SpaceError(f"{source}: {name!r} is given twice ({seen[name]!r} and {key!r})")
        seen[name] = str(key)
        dims.append(_dimension(name, target, value, source))
    return SearchSpace(
        tuple(dims),
        arch=space_arch,
        description=str(data.get("description") or ""),
        source=source,
    )


def _model_fields(arch: str) -> tuple[str, ...]:
    import architectures

    try:
        cls = architectures.config_class(arch)
    except KeyError as err:
        raise SpaceError(str(err.args[0])) from None
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in _FIXED_MODEL_FIELDS)


def _resolve(key: str, model_fields: tuple[str, ...], arch: str, source: str) -> tuple[str, str]:
    prefix, dot, rest = key.partition(".")
    if dot and prefix in ("model", "train"):
        target, name = prefix, rest
    elif key in model_fields:
        target, name = "model", key
    elif key in TUNABLE_TRAIN_FIELDS:
        target, name = "train", key
    else:
        target, name = "", key
    if target == "model" and name in model_fields:
        return target, name
    if target == "train" and name in TUNABLE_TRAIN_FIELDS:
        return target, name
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    if name in train_names and target != "model":
        raise SpaceError(
            f"space field {key!r} is not tunable: it is the sweep's own setting, the same for "
            f"every trial (give it as an option); tunable training fields: "
            f"{', '.join(TUNABLE_TRAIN_FIELDS)} [{source}]"
        )
    raise SpaceError(
        f"space field {key!r}: {arch} has no such setting; its config fields: "
        f"{', '.join(model_fields)}; tunable training fields: "
        f"{', '.join(TUNABLE_TRAIN_FIELDS)} [{source}]"
    )


def _dimension(name: str, target: str, value: Any, source: str) -> Dimension:
    where = f"space field {name!r} [{source}]"
    if not isinstance(value, Mapping):
        return Dimension(name, target, "fixed", values=(_hashable(value),))
    if len(value) != 1:
        raise SpaceError(f"{where}: give one of {', '.join(KINDS)} (got {', '.join(value)})")
    kind, arg = next(iter(value.items()))
    if kind not in KINDS:
        raise SpaceError(f"{where}: unknown domain {kind!r}; domains: {', '.join(KINDS)}")
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise SpaceError(f"{where}: choice needs a non-empty list of values")
        values = tuple(_hashable(v) for v in arg)
        if len(set(map(repr, values))) != len(values):
            raise SpaceError(f"{where}: choice lists a value twice")
        return Dimension(name, target, "choice", values=values)
    if (
        not isinstance(arg, list)
        or len(arg) != 2
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in arg)
    ):
        raise SpaceError(f"{where}: {kind} needs [low, high] (two numbers)")
    low, high = float(arg[0]), float(arg[1])
    if not low < high if kind != "randint" else not low <= high:
        raise SpaceError(f"{where}: {kind} needs low < high (got {arg[0]}, {arg[1]})")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{where}: loguniform needs low > 0 (got {arg[0]})")
    if kind == "randint" and (low != int(low) or high != int(high)):
        raise SpaceError(f"{where}: randint needs two integers (got {arg[0]}, {arg[1]})")
    return Dimension(name, target, kind, low=low, high=high)


# ---- helpers ----------------------------------------------------------------------------------


def _hashable(value: Any) -> Any:
    """Lists (JSON/YAML) become tuples, as configs hold them."""
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _hashable(v) for k, v in value.items()}
    return value


def _plain(value: Any) -> Any:
    """Tuples become lists (JSON, Tune's config)."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _config_value(value: Any) -> Any:
    return _hashable(value)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_show(v) for v in value) + ")"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _reason(err: BaseException) -> str:
    """The config's message without TrainConfig's ``arch_params (ARCH):`` wrapper."""
    return re.sub(r"^TrainConfig\.arch_params \([^)]*\): ", "", str(err))


def _culprit(dims: Iterable[Dimension], err: BaseException) -> Dimension | None:
    text = str(err)
    for dim in dims:
        if dim.field in text:
            return dim
    return None


def _refusal(dim: Dimension | None, value: Any, base: TrainConfig, err: BaseException) -> str:
    if dim is None:
        return f"space refused: {_reason(err)}"
    owner = f"{base.arch}'s config" if dim.target == "model" else "the training config"
    return f"space field {dim.name!r}: value {_show(value)} is refused by {owner}: {_reason(err)}"
