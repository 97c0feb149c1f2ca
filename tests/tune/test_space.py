"""Search spaces: presets, parsing, and every bad value refused before anything starts.

No Ray here: a refused space must fail in the driver before Ray, storage or MLflow are touched
(``test_bad_space_is_refused_by_the_command_before_anything_starts``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segplatform.train import TrainConfig
from segplatform.tune.presets import PRESETS
from segplatform.tune.space import SpaceError, load_space


def base(arch: str, **fields: object) -> TrainConfig:
    return TrainConfig(arch=arch, data="unused", **fields)


@pytest.mark.parametrize("arch", sorted(PRESETS))
@pytest.mark.parametrize("tiny", [False, True])
def test_every_preset_is_valid_for_its_architecture(arch: str, tiny: bool) -> None:
    space = load_space(arch, arch)
    assert space.source == f"preset {arch}" and space.arch == arch
    space.validate(base(arch, tiny=tiny))
    assert "lr" in space.names
    # A preset is data: its dict form reads back to the same space.
    again = load_space(space.to_dict(), arch)
    assert again.to_dict() == space.to_dict()


def test_presets_vary_what_the_papers_vary() -> None:
    assert {"atrous_rates", "output_stride", "multi_grid"} <= set(
        load_space("deeplab_v3", "deeplab_v3").names
    )
    assert {"atrous_rates", "output_stride"} <= set(load_space("deeplab_v2", "deeplab_v2").names)
    assert {"bins", "aux_weight"} <= set(load_space("pspnet", "pspnet").names)
    assert "bins" in load_space("icnet", "icnet").names
    assert "crp_stages" in load_space("refinenet", "refinenet").names


def test_space_file_yaml_and_json(tmp_path: Path) -> None:
    yaml_file = tmp_path / "space.yaml"
    yaml_file.write_text(
        "params:\n"
        "  atrous_rates: {choice: [[1, 2, 3], [2, 4, 6]]}\n"
        "  model.output_stride: {choice: [8, 16]}\n"
        "  train.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
        "  batch_size: 4\n"
    )
    space = load_space(str(yaml_file), "deeplab_v3")
    assert space.names == ("atrous_rates", "output_stride", "lr")  # batch_size is fixed
    assert space.dimension("atrous_rates").values == ((1, 2, 3), (2, 4, 6))
    assert space.dimension("output_stride").target == "model"
    assert space.dimension("lr").target == "train"
    assert space.dimension("batch_size").kind == "fixed"
    config = space.apply(
        base("deeplab_v3", tiny=True), {"atrous_rates": [2, 4, 6], "output_stride": 8, "lr": 0.003}
    )
    assert config.arch_params == {"atrous_rates": (2, 4, 6), "output_stride": 8}
    assert config.lr == 0.003 and config.batch_size == 4
    json_file = tmp_path / "space.json"
    json_file.write_text(json.dumps(space.to_dict()))
    assert load_space(str(json_file), "deeplab_v3").to_dict() == space.to_dict()
    with pytest.raises(SpaceError, match="grid"):
        space.grid_size()  # lr is a range


def test_grid_size_and_domains() -> None:
    space = load_space(
        {"params": {"bins": {"choice": [[1], [1, 2, 3, 6]]}, "aux_weight": {"choice": [0.2, 0.4]}}},
        "pspnet",
    )
    assert space.grid_size() == 4
    grid = space.param_space(grid=True)
    assert grid["bins"] == {"grid_search": [[1], [1, 2, 3, 6]]}
    sampled = space.param_space(grid=False)
    assert sampled["aux_weight"].categories == [0.2, 0.4]


def bad(arch: str, key: str, domain: object, *words: str, written_for: str = "") -> tuple:
    """(architecture, space data, words its refusal must hold)."""
    top = {"arch": written_for} if written_for else {}
    return arch, {**top, "params": {key: domain}}, list(words)


BAD_SPACES = [
    bad("deeplab_v3", "output_stride", {"choice": [16, 4]}, "'output_stride'", "4", "8 or 16"),
    bad("pspnet", "bins", {"choice": [[1, 2, 3, 6], []]}, "'bins'", "()", "non-empty"),
    bad(
        "deeplab_v3",
        "atrous_rates",
        {"choice": [[6, 12, 18], [-6, 12, 18]]},
        "'atrous_rates'",
        "(-6, 12, 18)",
        "positive",
    ),
    bad("deeplab_v3", "atrous_rates", {"choice": [[0, 12, 18]]}, "(0, 12, 18)", "positive"),
    bad("deeplab_v3", "aspp_rates", {"choice": [[6, 12, 18]]}, "'aspp_rates'", "atrous_rates"),
    bad("deeplab_v3", "bins", {"choice": [[1, 2]]}, "'bins'", "deeplab_v3 has no such setting"),
    bad("deeplab_v3", "bins", {"choice": [[1, 2]]}, "'arch'", "pspnet", written_for="pspnet"),
    bad("deeplab_v3", "storage_path", {"choice": ["a", "b"]}, "'storage_path'", "not tunable"),
    bad("deeplab_v3", "lr", {"loguniform": [0.0, 0.1]}, "'lr'", "low > 0"),
    bad("deeplab_v3", "lr", {"uniform": [-0.1, 0.1]}, "'lr'", "-0.1", "> 0"),
    bad("deeplab_v3", "lr", {"normal": [0.0, 0.1]}, "'lr'", "normal", "choice"),
    bad("refinenet", "crp_stages", {"randint": [0, 4]}, "'crp_stages'", "0", ">= 1"),
    bad("pspnet", "aux_weight", {"choice": [0.4, -1.0]}, "'aux_weight'", "-1", ">= 0"),
    bad("deeplab_v3", "crop_size", {"choice": [64, 4]}, "'crop_size'", "4", ">= 8"),
]


@pytest.mark.parametrize(("arch", "data", "words"), BAD_SPACES)
def test_bad_space_names_the_field(arch: str, data: dict, words: list[str]) -> None:
    with pytest.raises(SpaceError) as caught:
        load_space(data, arch).validate(base(arch, tiny=True))
    message = str(caught.value)
    for word in words:
        assert word in message, message


def test_combination_of_valid_values_is_checked_as_a_whole() -> None:
    # Each value is fine alone; SGD momentum with AdamW is not.
    space = load_space(
        {"params": {"optimizer": {"choice": ["sgd", "adamw"]}, "momentum": {"choice": [0.9]}}},
        "unet",
    )
    with pytest.raises(SpaceError, match=r"combination optimizer=adamw, momentum=0\.9"):
        space.validate(base("unet", tiny=True))


def test_unknown_preset_or_missing_file() -> None:
    with pytest.raises(SpaceError, match="neither a file nor a preset"):
        load_space("deeplab_v9", "deeplab_v3")


def test_bad_space_is_refused_by_the_command_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_dataset, no_ray_cluster: None
) -> None:
    import ray

    from segplatform.tune.cli import sweep_main

    data = tmp_path / "data"
    tiny_dataset(data)
    storage = tmp_path / "runs"
    space = tmp_path / "bad.yaml"
    space.write_text("params:\n  output_stride: {choice: [4, 8]}\n")
    status = sweep_main(
        [
            "--arch", "deeplab_v3", "--tiny", "--data", str(data), "--space", str(space),
            "--storage", str(storage), "--name", "refused", "--mlflow-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: sweep refused refused: space field 'output_stride': value 4"), err
    assert not storage.exists() and not (tmp_path / "mlflow.db").exists()
    assert not ray.is_initialized()
