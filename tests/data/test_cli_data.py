"""``segplatform data convert|inspect|preview`` end to end, in process and as the console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from segplatform.cli import build_parser, main
from segplatform.data import iter_samples

SCRIPT = Path(sys.executable).with_name("segplatform")


def test_convert_inspect_preview_voc(
    layouts: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = layouts.write_voc(tmp_path / "src")
    dest = tmp_path / "voc"
    assert main(["data", "convert", "voc", str(tree.root), str(dest)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {dest}: 5 rows (train 3, val 2)" in out
    for sample in iter_samples(str(dest), "val"):
        np.testing.assert_array_equal(sample["mask"], tree.masks[sample["id"]])

    assert main(["data", "inspect", str(dest), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["name"] == "voc2012" and len(report["classes"]) == 21
    assert report["splits"]["train"]["rows"] == 3 and report["splits"]["val"]["rows"] == 2
    assert report["splits"]["train"]["image_size"]["common"] == [32, 40]
    stacked = np.concatenate([tree.masks[i].ravel() for i in tree.splits["train"]])
    assert report["splits"]["train"]["class_pixels"]["person"] == int((stacked == 15).sum()) > 0
    assert report["splits"]["train"]["ignore_pixels"] == int((stacked == 255).sum())

    assert main(["data", "inspect", str(dest)]) == 0
    table = capsys.readouterr().out
    assert "voc2012" in table and "person" in table and "tvmonitor" in table

    grid = tmp_path / "grid.png"
    assert main(["data", "preview", str(dest), "--out", str(grid), "--split", "val"]) == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(grid) as image:
        assert image.format == "PNG"
        # 2 samples -> 2 columns of 256 px tiles with 8 px gaps
        assert image.width == 2 * 256 + 3 * 8 and image.height > 256
        pixels = np.asarray(image).reshape(-1, 3)
        colours = {tuple(v) for v in np.unique(pixels, axis=0).tolist()}
    val_classes = {int(v) for i in tree.splits["val"] for v in np.unique(tree.masks[i])}
    assert val_classes - {0, 255}
    for class_id in val_classes - {0, 255}:
        assert tuple(report["palette"][class_id]) in colours  # legend swatch
    assert (255, 255, 255) in colours and (255, 0, 255) in colours  # ignore stripes


def test_convert_errors_are_one_line_exit_2_and_leave_nothing(
    layouts: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = layouts.write_voc(tmp_path / "src")
    (tree.voc / "ImageSets" / "Segmentation" / "val.txt").unlink()
    out = tmp_path / "out"
    out.mkdir()
    assert main(["data", "convert", "voc", str(tree.root), str(out / "voc")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "ImageSets/Segmentation/val.txt" in err and "Traceback" not in err
    layouts.assert_nothing_written(out)

    layouts.truncate(tree.voc / "JPEGImages" / f"{tree.splits['train'][0]}.jpg")
    argv = ["data", "convert", "voc", str(tree.root), str(out / "voc"), "--splits", "train"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{tree.splits['train'][0]}.jpg" in err and "cannot be decoded" in err
    layouts.assert_nothing_written(out)

    assert main(["data", "inspect", str(out)]) == 2
    assert "not a dataset" in capsys.readouterr().err


def test_skip_bad_lists_each_skipped_sample(
    layouts: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = layouts.write_voc(tmp_path / "src")
    broken = tree.splits["train"][0]
    (tree.voc / "SegmentationClass" / f"{broken}.png").unlink()
    dest = tmp_path / "voc"
    args = ["data", "convert", "voc", str(tree.root), str(dest), "--skip-bad"]
    assert main([*args, "--splits", "train"]) == 0
    captured = capsys.readouterr()
    assert "2 rows (train 2)" in captured.out
    assert "skipped 1 bad sample(s):" in captured.err
    assert f"{broken}.png: mask file is missing" in captured.err

    assert main([*args, "--splits", "train"]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--splits", "train,val", "--overwrite"]) == 0
    assert "4 rows (train 2, val 2)" in capsys.readouterr().out


def test_convert_coco_and_cityscapes_through_the_cli(
    layouts: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coco = layouts.write_coco(tmp_path / "coco")
    split = "train=annotations/instances_train2017.json:train2017"
    dest = tmp_path / "coco-ds"
    assert main(["data", "convert", "coco", str(coco.root), str(dest), "--split", split]) == 0
    assert "2 rows (train 2)" in capsys.readouterr().out
    assert all(s["instances"] is not None for s in iter_samples(str(dest), "train"))
    cityscapes = layouts.write_cityscapes(tmp_path / "cs")
    dest = tmp_path / "cs-ds"
    assert main(["data", "convert", "cityscapes", str(cityscapes.root), str(dest),
                 "--splits", "val", "--name", "cs-val"]) == 0  # fmt: skip
    assert "1 rows (val 1)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["mni152-tissue", "SRC", "DEST"], "mni152-tissue takes only DEST"),
        (["voc", "DEST"], "voc takes SRC and DEST"),
        (["voc", "SRC", "DEST", "--split", "a=b.json:c"], "--split applies to coco, not voc"),
        (["coco", "SRC", "DEST", "--split", "nonsense"], "NAME=ANNOTATIONS.json:IMAGE_DIR"),
        (["unknown", "SRC", "DEST"], "invalid choice"),
    ],
)
def test_convert_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["data", "convert", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["convert", "inspect", "preview"])
def test_every_command_help_has_an_example(command: str) -> None:
    parser = build_parser()
    data = next(
        action for action in parser._subparsers._group_actions if "data" in action.choices
    ).choices["data"]
    assert "Example" in data.format_help()
    sub = next(a for a in data._subparsers._group_actions).choices[command]
    text = sub.format_help()
    assert "Example" in text and f"segplatform data {command} " in text


def test_console_script_exit_code_and_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(SCRIPT), "data", "convert", "cityscapes", str(tmp_path / "nope"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()
    helped = subprocess.run(
        [str(SCRIPT), "data", "preview", "--help"], capture_output=True, text=True, timeout=120
    )
    assert helped.returncode == 0 and "segplatform data preview ./data/voc --out" in helped.stdout
