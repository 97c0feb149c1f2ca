"""Dataset inspection (statistics, rich tables) and the preview grid."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from segplatform.data import DatasetError, DatasetInfo, DatasetWriter, Sample
from segplatform.data.inspect import (
    GAP,
    TILE,
    inspect_dataset,
    preview_dataset,
    preview_layout,
    render_inspection,
)
from segplatform.visualize import IGNORE_STRIPES, overlay

CLASSES = ("background", "road", "car")
PALETTE = ((0, 0, 0), (200, 40, 120), (10, 220, 60))
GREY = 100  # value of every image pixel


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(uri: Path) -> dict[str, list[np.ndarray]]:
    """train: two 20x30 RGB + one 16x16 grey; val: one 20x30 RGB. Grey images, known masks."""
    masks: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    plan = [("train", 20, 30, 3), ("train", 20, 30, 3), ("train", 16, 16, 1), ("val", 20, 30, 3)]
    info = DatasetInfo("tiny", CLASSES, PALETTE)
    with DatasetWriter(str(uri), info, max_shard_bytes=100) as writer:
        for index, (split, height, width, channels) in enumerate(plan):
            shape = (height, width, 3) if channels == 3 else (height, width)
            image = np.full(shape, GREY, dtype=np.uint8)
            mask = np.zeros((height, width), dtype=np.uint8)
            mask[: height // 2, :] = 1  # road: top half
            mask[height // 2 :, : width // 4] = 2  # car: a bottom-left block
            mask[-1, -1] = 255
            writer.add(split, Sample(f"s{index}", _png(image), mask))
            masks[split].append(mask)
    return masks


def test_inspect_reports_sizes_channels_frequencies_and_shards(tmp_path: Path) -> None:
    uri = tmp_path / "ds"
    masks = _write(uri)
    report = inspect_dataset(str(uri))
    assert report["name"] == "tiny" and report["classes"] == list(CLASSES)
    assert report["rows"] == 4
    train = report["splits"]["train"]
    assert train["rows"] == 3
    assert train["image_size"] == {"min": [16, 16], "max": [20, 30], "common": [20, 30],
                                   "common_count": 2}  # fmt: skip
    assert train["channels"] == {"1": 1, "3": 2}
    for split, split_masks in masks.items():
        stacked = np.concatenate([m.ravel() for m in split_masks])
        entry = report["splits"][split]
        expected = {name: int((stacked == i).sum()) for i, name in enumerate(CLASSES)}
        assert entry["class_pixels"] == expected
        labelled = sum(expected.values())
        assert entry["class_frequency"]["road"] == pytest.approx(expected["road"] / labelled)
        assert entry["ignore_pixels"] == int((stacked == 255).sum()) == len(split_masks)
        assert entry["total_pixels"] == stacked.size
    files = sorted((uri / "train").glob("*.parquet"))
    assert len(files) >= 2  # the small shard limit split the rows
    assert train["shards"] == len(files)
    assert train["bytes"] == sum(os.path.getsize(f) for f in files)
    assert report["shards"] == train["shards"] + report["splits"]["val"]["shards"]
    assert train["has_instances"] is False

    console = Console(record=True, width=160, color_system=None)
    render_inspection(report, console=console)
    text = console.export_text()
    for needle in ("tiny", "train", "val", "road", "car", "30x20", "16x16", "ignore"):
        assert needle in text
    road_share = 100 * report["splits"]["val"]["class_frequency"]["road"]
    assert f"{road_share:.2f}%" in text


def test_inspect_rejects_a_non_dataset(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not a dataset"):
        inspect_dataset(str(tmp_path / "empty"))


def test_overlay_blends_palette_and_stripes_ignore() -> None:
    image = np.full((8, 8, 3), GREY, dtype=np.uint8)
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:4] = 1
    mask[6:, 6:] = 255
    out = overlay(image, mask, PALETTE, alpha=0.5, ignore_index=255)
    expected_road = [round(0.5 * GREY + 0.5 * c) for c in PALETTE[1]]
    assert out[0, 0].tolist() == expected_road
    assert out[5, 0].tolist() == [GREY // 2] * 3  # background (black) at half strength
    stripe_colours = {tuple(v) for v in out[6:, 6:].reshape(-1, 3).tolist()}
    assert stripe_colours <= set(IGNORE_STRIPES) and stripe_colours


def _colours(path: Path) -> set[tuple[int, int, int]]:
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return {tuple(v) for v in np.unique(array.reshape(-1, 3), axis=0).tolist()}


def test_preview_grid_size_overlays_and_legend(tmp_path: Path) -> None:
    uri = tmp_path / "ds"
    _write(uri)
    out = tmp_path / "previews" / "grid.png"
    result = preview_dataset(str(uri), out, split="train", n=8, seed=0)
    assert len(result["ids"]) == 3  # only 3 rows in train
    assert result["classes"] == ["background", "road", "car"]
    layout = preview_layout(3, 4)  # 3 classes + the ignore entry in the legend
    with Image.open(out) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.size == (layout["width"], layout["height"]) == tuple(result["size"])
    assert layout["columns"] == 2 and layout["width"] == 2 * TILE + 3 * GAP
    colours = _colours(out)
    for colour in PALETTE[1:]:
        assert tuple(colour) in colours  # legend swatches
        assert tuple(round(0.5 * GREY + 0.5 * c) for c in colour) in colours  # overlays
    assert set(IGNORE_STRIPES) <= colours

    again = preview_dataset(str(uri), tmp_path / "again.png", split="train", n=2, seed=0)
    same = preview_dataset(str(uri), tmp_path / "same.png", split="train", n=2, seed=0)
    assert again["ids"] == same["ids"] and len(again["ids"]) == 2
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "same.png").read_bytes()


def test_preview_unknown_split(tmp_path: Path) -> None:
    uri = tmp_path / "ds"
    _write(uri)
    with pytest.raises(DatasetError, match="unknown split 'test'"):
        preview_dataset(str(uri), tmp_path / "x.png", split="test")
    assert not (tmp_path / "x.png").exists()
