"""The dataset format: manifest, writer validation, sharding, atomic overwrite, reader errors."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segplatform.data import (
    MANIFEST_VERSION,
    BadSampleError,
    DatasetError,
    DatasetInfo,
    DatasetWriter,
    Sample,
    decode_image,
    decode_mask,
    default_palette,
    iter_samples,
    read_manifest,
    validate_dataset,
)
from segplatform.data.io import StorageError, local_path, resolve, s3_settings


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


INFO = DatasetInfo("unit", ("a", "b", "c"), default_palette(3))


def test_manifest_json_round_trip_and_validation() -> None:
    info = DatasetInfo("x", ["a", "b"], [[0, 0, 0], [1, 2, 3]], ignore_index=255, splits={"t": 3})
    assert DatasetInfo.from_json(info.to_json(), "mem") == info
    assert info.to_json()["splits"] == {"t": {"rows": 3}}
    assert info.to_json()["version"] == MANIFEST_VERSION
    with pytest.raises(DatasetError, match="palette has 1 colours for 2 classes"):
        DatasetInfo("x", ("a", "b"), ((0, 0, 0),))
    with pytest.raises(DatasetError, match="ignore_index"):
        DatasetInfo("x", ("a", "b"), default_palette(2), ignore_index=1)
    with pytest.raises(DatasetError, match="unique"):
        DatasetInfo("x", ("a", "a"), default_palette(2))


def test_round_trip_is_pixel_identical_with_shards(tmp_path: Path, tiny_dataset, make_sample):
    uri = tmp_path / "ds"
    info = tiny_dataset(uri, splits={"train": 7, "val": 3}, max_shard_bytes=4000)
    assert info.splits == {"train": 7, "val": 3}
    assert len(list((uri / "train").glob("part-*.parquet"))) > 1  # bounded shards
    assert validate_dataset(str(uri), check_samples=True) == info
    manifest = json.loads((uri / "dataset.json").read_text())
    assert set(manifest) == {
        "name", "classes", "palette", "ignore_index", "splits", "version", "revision",
    }  # fmt: skip
    rows = list(iter_samples(str(uri), "train")) + list(iter_samples(f"file://{uri}", "val"))
    assert [r["id"] for r in rows] == [f"sample-{i:04d}" for i in range(10)]
    for index, row in enumerate(rows):
        expected = make_sample(index)
        np.testing.assert_array_equal(row["image"], decode_image(expected.image))
        np.testing.assert_array_equal(row["mask"], expected.mask)
        assert row["mask"].dtype == np.uint8 and row["image"].shape == (24, 32, 3)
    # no temporary siblings remain
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_uint16_masks_and_instances(tmp_path: Path, tiny_dataset, make_sample) -> None:
    tiny_dataset(tmp_path / "inst", with_instances=True, splits={"s": 2})
    for index, row in enumerate(iter_samples(str(tmp_path / "inst"), "s")):
        assert row["instances"].dtype == np.uint16
        np.testing.assert_array_equal(
            row["instances"], make_sample(index, with_instances=True).instances
        )
    info = DatasetInfo("big", tuple(map(str, range(300))), default_palette(300), ignore_index=65535)
    mask = np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) % 300
    mask[0, 0] = 65535
    instances = np.arange(24 * 32, dtype=np.uint16).reshape(24, 32)
    image = png_bytes(np.zeros((24, 32), np.uint8))
    with DatasetWriter(tmp_path / "u16", info) as writer:
        writer.add("train", Sample("a", image, mask, instances=instances))
    (row,) = iter_samples(str(tmp_path / "u16"), "train")
    assert row["mask"].dtype == np.uint16
    np.testing.assert_array_equal(row["mask"], mask)
    np.testing.assert_array_equal(row["instances"], instances)
    assert row["image"].shape == (24, 32, 1)


def test_bad_samples_name_the_source(tmp_path: Path, make_sample) -> None:
    good = make_sample(0)
    truncated = good.image[: len(good.image) // 2]
    cases = [
        (Sample("t", truncated, good.mask, source="cut.png"), "cut.png: image cannot be decoded"),
        (Sample("g", b"not an image", good.mask, source="junk.png"), "junk.png: image cannot"),
        (Sample("s", good.image, good.mask[:-1], source="small.png"), "32x24 .* mask is 32x23"),
        (Sample("l", good.image, good.mask + 3, source="lab.png"), "lab.png: mask has label"),
        (Sample("", good.image, good.mask, source="noid.png"), "noid.png: sample id"),
    ]
    with DatasetWriter(tmp_path / "ds", INFO) as writer:
        writer.add("train", make_sample(0))
        for sample, message in cases:
            with pytest.raises(BadSampleError, match=message):
                writer.add("train", sample)
        with pytest.raises(BadSampleError, match="duplicate id 'sample-0000'"):
            writer.add("train", make_sample(0))
        writer.add("val", make_sample(0))  # the same id in another split is fine
    assert read_manifest(str(tmp_path / "ds")).splits == {"train": 1, "val": 1}


def test_refuses_overwrite_and_replaces_atomically(tmp_path: Path, tiny_dataset) -> None:
    uri = tmp_path / "ds"
    tiny_dataset(uri, splits={"train": 2})
    with pytest.raises(DatasetError, match="already exists"):
        tiny_dataset(uri, splits={"train": 3})
    # a failing replacement leaves the old dataset untouched
    with pytest.raises(RuntimeError), DatasetWriter(uri, INFO, overwrite=True) as writer:
        writer.add(
            "train", Sample("x", png_bytes(np.zeros((4, 4), np.uint8)), np.zeros((4, 4), np.uint8))
        )
        raise RuntimeError("boom")
    assert validate_dataset(str(uri)).splits == {"train": 2}
    tiny_dataset(uri, splits={"train": 3, "val": 1}, overwrite=True)
    assert validate_dataset(str(uri)).splits == {"train": 3, "val": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_failed_write_leaves_nothing(tmp_path: Path, make_sample) -> None:
    with (
        pytest.raises(BadSampleError),
        DatasetWriter(tmp_path / "ds", INFO, max_shard_bytes=1) as w,
    ):
        w.add("train", make_sample(0))  # flushed to a shard at once
        w.add("train", Sample("bad", b"junk", make_sample(1).mask, source="bad.png"))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DatasetError, match="no samples"), DatasetWriter(tmp_path / "e", INFO):
        pass
    assert list(tmp_path.iterdir()) == []


def test_destination_with_other_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty and is not a dataset"):
        DatasetWriter(tmp_path / "ds", INFO, overwrite=True)


def test_reader_errors(tmp_path: Path, tiny_dataset) -> None:
    with pytest.raises(DatasetError, match="not a dataset: the location does not exist"):
        read_manifest(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"not a dataset: dataset\.json is missing"):
        list(iter_samples(str(tmp_path / "empty"), "train"))

    uri = tmp_path / "ds"
    tiny_dataset(uri)
    with pytest.raises(DatasetError, match="unknown split 'test'"):
        list(iter_samples(str(uri), "test"))
    manifest = json.loads((uri / "dataset.json").read_text())
    (uri / "dataset.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(DatasetError, match="unknown manifest version 99"):
        read_manifest(str(uri))
    (uri / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_manifest(str(uri))
    (uri / "dataset.json").write_text(json.dumps(manifest))

    shard = uri / "val" / "part-00000.parquet"
    pq.write_table(pq.read_table(shard).drop_columns(["mask"]), shard)
    with pytest.raises(DatasetError, match=r"part-00000\.parquet: shard is missing column 'mask'"):
        list(iter_samples(str(uri), "val"))
    with pytest.raises(DatasetError, match="missing column 'mask'"):
        validate_dataset(str(uri))
    (uri / "val" / "part-00000.parquet").unlink()
    with pytest.raises(DatasetError, match="split 'val' has no shards"):
        validate_dataset(str(uri))


def test_row_count_mismatch(tmp_path: Path, tiny_dataset) -> None:
    uri = tmp_path / "ds"
    tiny_dataset(uri)
    manifest = json.loads((uri / "dataset.json").read_text())
    manifest["splits"]["train"]["rows"] = 5
    (uri / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="has 6 rows but the manifest says 5"):
        validate_dataset(str(uri))


def test_uri_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert local_path(f"file://{tmp_path}") == str(tmp_path)
    assert resolve(str(tmp_path))[1] == str(tmp_path)
    assert resolve("s3://bucket/a/b/", {"endpoint_url": "http://127.0.0.1:1"})[1] == "bucket/a/b"
    with pytest.raises(StorageError, match="unsupported URI scheme 'gs'"):
        resolve("gs://bucket/x")
    with pytest.raises(StorageError, match="unknown storage option"):
        resolve("s3://b/x", {"endpoint": "http://x"})
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "envkey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert s3_settings().endpoint_url == "http://env:1"
    explicit = s3_settings({"endpoint_url": "http://opt:2", "key": "k", "secret": "s"})
    assert (explicit.endpoint_url, explicit.key, explicit.secret, explicit.region) == (
        "http://opt:2",
        "k",
        "s",
        "eu-west-1",
    )


def test_decode_helpers() -> None:
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.testing.assert_array_equal(decode_image(png_bytes(rgb)), rgb)
    assert decode_image(png_bytes(rgb), channels=1).shape == (2, 3, 1)
    grey = rgb[..., 0]
    assert decode_image(png_bytes(grey), channels=3).shape == (2, 3, 3)
    np.testing.assert_array_equal(decode_mask(png_bytes(grey)), grey)
    assert os.path.isabs(local_path("relative/dir"))


def test_the_revision_follows_the_rows_content(tmp_path, tiny_dataset) -> None:
    from segplatform.data.format import read_manifest

    first = tiny_dataset(tmp_path / "a")
    same = tiny_dataset(tmp_path / "b")  # the same samples written again elsewhere
    other = tiny_dataset(tmp_path / "c", splits={"train": 6, "val": 3})
    relabelled = tiny_dataset(tmp_path / "d", num_classes=4)
    assert len(first.revision) == 16
    assert first.revision == same.revision == read_manifest(str(tmp_path / "a")).revision
    assert len({first.revision, other.revision, relabelled.revision}) == 3
