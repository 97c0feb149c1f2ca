"""The registry-wide contract (the ``architectures`` package docstring), checked for every
semantic entry of ARCHITECTURES.

Each test runs the entry's ``tiny()`` config on CPU. Entries whose model class declares a
non-semantic ``task`` (``mask_rcnn``: ``task = "instance"``) keep torchvision's detection contract
and are checked by their own test file; the registry-level tests (names, parameters, configs,
completeness) still cover them.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import architectures
from architectures import (
    ARCHITECTURES,
    build_config,
    build_from_config,
    build_model,
    config_to_dict,
)

# Modules of architectures/ that hold shared code rather than an architecture of their own.
NON_ARCHITECTURE_MODULES = {"backbones", "flops"}

ALL_NAMES = sorted(ARCHITECTURES)
SEMANTIC_NAMES = [
    name for name in ALL_NAMES if getattr(ARCHITECTURES[name][1], "task", "semantic") == "semantic"
]
SIZES = [(64, 64), (65, 47)]


def _tiny_model(name: str, seed: int = 0, **overrides: object) -> nn.Module:
    torch.manual_seed(seed)
    config_cls, _ = ARCHITECTURES[name]
    return build_from_config(name, config_cls.tiny(**overrides))


def _images(height: int, width: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=generator)


def _num_classes(model: nn.Module) -> int:
    return model.config.num_classes  # type: ignore[union-attr]


def _loss(
    outputs: dict[str, torch.Tensor], weights: dict[str, float], seed: int = 2
) -> torch.Tensor:
    """Weighted cross-entropy of every output against one random label map, resized to it."""
    first = outputs["out"]
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(
        0, first.shape[1], (first.shape[0], 1, *first.shape[-2:]), generator=generator
    )
    total = first.new_zeros(())
    for key, logits in outputs.items():
        resized = F.interpolate(target.float(), size=logits.shape[-2:], mode="nearest")
        total = total + weights[key] * F.cross_entropy(logits, resized[:, 0].long())
    return total


def test_registry_holds_the_design_names() -> None:
    expected = {"fcn32s", "fcn16s", "fcn8s", "segnet", "unet"}
    assert expected <= set(ARCHITECTURES)
    for name, (config_cls, model_cls) in ARCHITECTURES.items():
        assert dataclasses.is_dataclass(config_cls), name
        assert issubclass(model_cls, nn.Module), name


@pytest.mark.parametrize("name", SEMANTIC_NAMES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_eval_output_is_logits_at_input_size(name: str, size: tuple[int, int]) -> None:
    model = _tiny_model(name).eval()
    height, width = size
    with torch.no_grad():
        try:
            outputs = model(_images(height, width))
        except ValueError as error:  # allowed only with a message that names the size
            assert str(height) in str(error) or str(width) in str(error), error
            return
    assert set(outputs) == {"out"}, f"{name}: eval outputs {sorted(outputs)}"
    out = outputs["out"]
    assert out.shape == (2, _num_classes(model), height, width)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", SEMANTIC_NAMES)
def test_training_gives_every_trainable_parameter_a_finite_gradient(name: str) -> None:
    model = _tiny_model(name).train()
    outputs = model(_images(64, 64))
    weights = model.loss_weights()
    assert set(outputs) == set(weights), f"{name}: outputs {sorted(outputs)} vs {sorted(weights)}"
    assert weights["out"] == 1.0
    loss = _loss(outputs, weights)
    assert torch.isfinite(loss)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, name
    missing = [n for n, p in trainable if p.grad is None]
    assert missing == [], f"{name}: no gradient for {missing[:5]}"
    non_finite = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert non_finite == [], f"{name}: non-finite gradient for {non_finite[:5]}"
    assert any(p.grad.abs().sum() > 0 for _, p in trainable), f"{name}: all gradients are zero"
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("name", SEMANTIC_NAMES)
def test_channels_last_gives_the_same_logits_and_gradients(name: str) -> None:
    # Training with channels_last (NHWC) must compute the same network: every layer accepts the
    # layout (max-unpooling indices, pyramid pooling, crops) and gives the same numbers.
    images = _images(64, 64)
    grads = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        model = _tiny_model(name).eval().to(memory_format=memory_format)  # eval: no dropout
        outputs = model(images.contiguous(memory_format=memory_format))
        _loss(outputs, {"out": 1.0}).backward()
        grads.append((outputs["out"].detach(), [p.grad for p in model.parameters()]))
    (reference, reference_grads), (logits, logits_grads) = grads
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    for expected, got in zip(reference_grads, logits_grads, strict=True):
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", SEMANTIC_NAMES)
def test_auxiliary_outputs_only_in_training_and_only_when_enabled(name: str) -> None:
    config_cls, _ = ARCHITECTURES[name]
    field_names = {f.name for f in dataclasses.fields(config_cls)}
    settings = [{"aux_loss": False}, {"aux_loss": True}] if "aux_loss" in field_names else [{}]
    images = _images(64, 64)
    for overrides in settings:
        model = _tiny_model(name, **overrides)
        model.train()
        train_keys = set(model(images))
        assert train_keys == set(model.loss_weights()), f"{name} {overrides}"
        assert "out" in train_keys
        if overrides.get("aux_loss") is False:
            assert train_keys == {"out"}, f"{name}: aux_loss=False still returns {train_keys}"
            assert model.loss_weights() == {"out": 1.0}
        if overrides.get("aux_loss") is True:
            assert train_keys > {"out"}, f"{name}: aux_loss=True returns no auxiliary output"
        model.eval()
        with torch.no_grad():
            assert set(model(images)) == {"out"}, f"{name} {overrides}: aux outputs in eval"


@pytest.mark.parametrize("name", SEMANTIC_NAMES)
def test_state_dict_round_trip_through_safetensors(name: str, tmp_path: Path) -> None:
    model = _tiny_model(name, seed=0).eval()
    with torch.no_grad():  # move zero-initialised layers off zero so the outputs differ
        generator = torch.Generator().manual_seed(5)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    path = tmp_path / "model.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, path)
    other = _tiny_model(name, seed=123).eval()
    images = _images(64, 64)
    with torch.no_grad():
        expected = model(images)["out"]
        assert not torch.equal(other(images)["out"], expected)
        other.load_state_dict(load_file(path), strict=True)
        assert torch.equal(other(images)["out"], expected)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_unknown_parameter_is_a_type_error(name: str) -> None:
    with pytest.raises(TypeError, match="no_such_parameter"):
        build_model(name, no_such_parameter=1)
    config_cls, _ = ARCHITECTURES[name]
    with pytest.raises(TypeError):
        config_cls.tiny(no_such_parameter=1)


def test_unknown_name_is_a_key_error_naming_the_valid_names() -> None:
    with pytest.raises(KeyError) as info:
        build_model("no_such_net")
    message = str(info.value)
    assert "no_such_net" in message
    assert all(name in message for name in ARCHITECTURES)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_configs_are_frozen_round_trip_and_tiny_is_smaller(name: str) -> None:
    config_cls, model_cls = ARCHITECTURES[name]
    default, tiny = config_cls(), config_cls.tiny()
    field = dataclasses.fields(config_cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(default, field, getattr(default, field))
    assert build_config(name, **config_to_dict(tiny)) == tiny
    assert build_config(name, **config_to_dict(default)) == default
    # Construction on the meta device counts parameters without allocating them.
    with torch.device("meta"):
        default_params = sum(p.numel() for p in model_cls(default).parameters())
        tiny_params = sum(p.numel() for p in model_cls(tiny).parameters())
    assert tiny_params < default_params, f"{name}: tiny {tiny_params} >= default {default_params}"


@pytest.mark.parametrize("name", SEMANTIC_NAMES)
def test_config_validation_names_the_field(name: str) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_config(name, num_classes=0)
    assert ARCHITECTURES[name][0].tiny(num_classes=5).num_classes == 5


def test_build_from_config_rejects_another_architectures_config() -> None:
    names = [n for n in ALL_NAMES if ARCHITECTURES[n][0] is not ARCHITECTURES["unet"][0]]
    with pytest.raises(TypeError, match="unet"):
        build_from_config("unet", ARCHITECTURES[names[0]][0].tiny())


def test_every_architecture_module_is_in_the_registry() -> None:
    registered_modules = {model_cls.__module__ for _, model_cls in ARCHITECTURES.values()}
    package_dir = Path(architectures.__file__).parent
    checked = []
    for info in pkgutil.iter_modules([str(package_dir)]):
        if info.name.startswith("_") or info.name in NON_ARCHITECTURE_MODULES:
            continue
        module = importlib.import_module(f"architectures.{info.name}")
        assert module.__name__ in registered_modules, (
            f"architectures/{info.name}.py defines no registry entry; add it to ARCHITECTURES "
            f"or, if it holds shared blocks, to NON_ARCHITECTURE_MODULES in this test"
        )
        checked.append(info.name)
    assert {"fcn", "segnet", "unet"} <= set(checked)
