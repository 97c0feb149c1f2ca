"""Datasets on a real S3 server (SeaweedFS, enforced credentials) and through Ray Data."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from segplatform.data import (
    BadSampleError,
    DatasetError,
    DatasetInfo,
    DatasetWriter,
    decode_image,
    decode_mask,
    fsspec_filesystem,
    iter_samples,
    read_manifest,
    read_ray_dataset,
    resolve,
    validate_dataset,
)
from segplatform.data.convert.folder import convert_folder


def read_bytes(path: str, options: dict) -> bytes:
    """The content of the S3 object at ``path`` (``bucket/key``)."""
    fs, _ = resolve(f"s3://{path}", options)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def listing(uri: str, options: dict) -> list[str]:
    """Files (not directories) under ``uri``."""
    fs, path = resolve(uri, options)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    infos = fs.get_file_info(selector)
    return sorted(info.path for info in infos if info.type == pafs.FileType.File)


def test_folder_round_trip_on_s3(tmp_path: Path, s3_server, s3_prefix, folder_tree, class_map_file):
    expected = folder_tree(tmp_path / "src", 4)
    options = s3_server.storage_options()
    uri = f"{s3_prefix}/folder"
    report = convert_folder(
        tmp_path / "src", uri, class_map=class_map_file, storage_options=options
    )
    assert report.rows == {"train": 4}
    assert validate_dataset(uri, options, check_samples=True).splits == {"train": 4}
    rows = {row["id"]: row for row in iter_samples(uri, "train", options)}
    assert sorted(rows) == sorted(expected)
    for stem, (image, labels) in expected.items():
        np.testing.assert_array_equal(rows[stem]["image"], image)
        np.testing.assert_array_equal(rows[stem]["mask"], labels)
    # nothing but the dataset under the bucket prefix (temporary prefix removed)
    bucket_files = listing(s3_prefix, options)
    assert all(p.startswith(uri[5:] + "/") for p in bucket_files), bucket_files
    # the same data through s3fs
    fs, path = fsspec_filesystem(uri, options)
    assert fs.exists(f"{path}/dataset.json")


def test_wrong_credentials_are_refused(s3_server, s3_prefix, tiny_dataset) -> None:
    options = s3_server.storage_options()
    tiny_dataset(f"{s3_prefix}/ds", storage_options=options)
    with pytest.raises(OSError, match=r"ACCESS_DENIED|InvalidAccessKeyId|SignatureDoesNotMatch"):
        read_manifest(f"{s3_prefix}/ds", {**options, "secret": "wrong-secret"})
    with pytest.raises(OSError):
        read_manifest(f"{s3_prefix}/ds", {**options, "key": "NOSUCHKEY"})


def test_environment_variables_and_explicit_options(
    monkeypatch: pytest.MonkeyPatch, s3_server, s3_prefix, tiny_dataset
) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    info = tiny_dataset(f"{s3_prefix}/env")  # credentials from the environment only
    assert read_manifest(f"{s3_prefix}/env") == info
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(OSError):
        read_manifest(f"{s3_prefix}/env")
    # explicit storage options win over the (wrong) environment
    assert read_manifest(f"{s3_prefix}/env", s3_server.storage_options()) == info


def test_failed_conversion_leaves_nothing_on_s3(
    tmp_path: Path, s3_server, s3_prefix, folder_tree, class_map_file
) -> None:
    options = s3_server.storage_options()
    folder_tree(tmp_path / "src", 5)
    (tmp_path / "src" / "images" / "img03.png").write_bytes(b"broken")
    with pytest.raises(BadSampleError, match=r"img03\.png: image cannot be decoded"):
        convert_folder(
            tmp_path / "src",
            f"{s3_prefix}/bad",
            class_map=class_map_file,
            storage_options=options,
            max_shard_bytes=1,  # the good samples before it are already uploaded
        )
    assert listing(s3_prefix, options) == []
    with pytest.raises(DatasetError, match="not a dataset"):
        read_manifest(f"{s3_prefix}/bad", options)


def test_overwrite_on_s3(s3_server, s3_prefix, tiny_dataset) -> None:
    options = s3_server.storage_options()
    uri = f"{s3_prefix}/ds"
    tiny_dataset(uri, splits={"train": 3, "val": 2}, storage_options=options, max_shard_bytes=1)
    with pytest.raises(DatasetError, match="already exists"):
        tiny_dataset(uri, storage_options=options)
    tiny_dataset(uri, splits={"train": 1}, storage_options=options, overwrite=True)
    assert validate_dataset(uri, options).splits == {"train": 1}
    files = listing(uri, options)
    assert files == [f"{uri[5:]}/dataset.json", f"{uri[5:]}/train/part-00000.parquet"]


def test_read_ray_dataset_local_and_s3(
    tmp_path: Path, ray_cluster, s3_server, s3_prefix, tiny_dataset, make_sample
) -> None:
    options = s3_server.storage_options()
    for uri, opts in ((str(tmp_path / "ds"), None), (f"{s3_prefix}/ray", options)):
        tiny_dataset(uri, splits={"train": 5, "val": 3}, storage_options=opts, max_shard_bytes=3000)
        dataset = read_ray_dataset(uri, "val", opts)
        rows = sorted(dataset.take_all(), key=lambda row: row["id"])
        assert [row["id"] for row in rows] == ["sample-0005", "sample-0006", "sample-0007"]
        for offset, row in enumerate(rows):
            expected = make_sample(5 + offset)
            assert (row["height"], row["width"]) == (24, 32)
            np.testing.assert_array_equal(decode_mask(row["mask"]), expected.mask)
            np.testing.assert_array_equal(decode_image(row["image"]), decode_image(expected.image))
        assert read_ray_dataset(uri, "train", opts).count() == 5
    with pytest.raises(DatasetError, match="unknown split"):
        read_ray_dataset(str(tmp_path / "ds"), "test")


class _FailsToPublish(DatasetWriter):
    """Fault injection: the new manifest cannot be written (the S3 server refusing a PUT)."""

    def _write_manifest(self, directory: str, info: DatasetInfo) -> None:
        if not posixpath.basename(directory).startswith("."):  # the destination, not a temp dir
            raise OSError("injected: PUT dataset.json refused")
        super()._write_manifest(directory, info)


def test_failed_overwrite_on_s3_puts_the_old_dataset_back(
    s3_server, s3_prefix, tiny_dataset, make_sample
) -> None:
    options = s3_server.storage_options()
    uri = f"{s3_prefix}/keep"
    tiny_dataset(uri, splits={"train": 3, "val": 2}, storage_options=options, max_shard_bytes=1)
    before = {path: read_bytes(path, options) for path in listing(uri, options)}
    old = read_manifest(uri, options)
    writer = _FailsToPublish(uri, old, overwrite=True, storage_options=options)
    writer.add("train", make_sample(7))
    with pytest.raises(OSError, match="injected"):
        writer.close()
    # The old dataset is back, byte for byte, and nothing else is left next to it.
    assert {path: read_bytes(path, options) for path in listing(uri, options)} == before
    assert validate_dataset(uri, options).splits == {"train": 3, "val": 2}
    assert listing(s3_prefix, options) == sorted(before)
