"""Readers for the dataset format: a Ray Dataset for training, a plain iterator for tools.

``read_ray_dataset`` returns rows with the stored columns (``id``, ``image`` bytes, ``mask`` bytes,
``height``, ``width`` and, when present, ``instances`` bytes); decode them in the training loop with
:func:`decode_image` and :func:`decode_mask`. ``iter_samples`` decodes for you.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from segplatform.data import io as dio
from segplatform.data.format import (
    DatasetError,
    DatasetInfo,
    check_schema,
    read_manifest,
    shard_paths,
)

if TYPE_CHECKING:
    import ray.data


def decode_image(data: bytes, channels: int | None = None) -> np.ndarray:
    """Decode PNG/JPEG bytes to a (H, W, C) uint8 array.

    ``channels=None`` keeps the stored mode (grey L -> C=1, RGB -> C=3); ``channels=3`` or ``1``
    converts.
    """
    with Image.open(io.BytesIO(data)) as image:
        if channels == 3 and image.mode != "RGB":
            image = image.convert("RGB")
        elif channels == 1 and image.mode != "L":
            image = image.convert("L")
        elif channels is None and image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        elif channels not in (None, 1, 3):
            raise ValueError(f"channels must be None, 1 or 3, got {channels}")
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]  # (H, W) -> (H, W, 1)
    return array


def decode_mask(data: bytes) -> np.ndarray:
    """Decode a PNG label map (or instance map) to a (H, W) uint8/uint16 array."""
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image)
    if array.ndim != 2:
        raise DatasetError(f"label PNG must be single-channel, got shape {array.shape}")
    if array.dtype not in (np.uint8, np.uint16):
        array = array.astype(np.uint16)
    return array


def _split_shards(
    uri: str, split: str, storage_options: dict[str, Any] | None
) -> tuple[DatasetInfo, Any, list[str]]:
    info = read_manifest(uri, storage_options)
    if split not in info.splits:
        raise DatasetError(
            f"{uri}: unknown split {split!r}; the dataset has {sorted(info.splits) or 'no splits'}"
        )
    fs, paths = shard_paths(uri, split, storage_options)
    if not paths and info.splits[split]:
        raise DatasetError(f"{uri}: split {split!r} has no Parquet shards")
    for path in paths:
        source = dio.display_uri(str(uri), path)
        try:
            schema = pq.read_schema(fs.open_input_file(path))
        except (OSError, pa.ArrowException) as exc:
            raise DatasetError(f"{source}: not a readable Parquet file ({exc})") from exc
        check_schema(schema, source)
    return info, fs, paths


def read_ray_dataset(
    uri: str,
    split: str,
    storage_options: dict[str, Any] | None = None,
    *,
    columns: Sequence[str] | None = None,
) -> ray.data.Dataset:
    """The rows of one split as a ``ray.data.Dataset`` (binary image/mask columns).

    Reads only the split's shards, through a pyarrow filesystem (so explicit S3 options reach the
    Ray workers). ``columns`` restricts the columns read.
    """
    import ray.data

    _, fs, paths = _split_shards(uri, split, storage_options)
    if not paths:
        raise DatasetError(f"{uri}: split {split!r} is empty")
    return ray.data.read_parquet(paths, filesystem=fs, columns=list(columns) if columns else None)


def iter_samples(
    uri: str,
    split: str,
    storage_options: dict[str, Any] | None = None,
    *,
    channels: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Decoded samples of one split, in stored order.

    Yields dicts with ``id`` (str), ``image`` (H, W, C) uint8, ``mask`` (H, W) uint8/uint16 and,
    when stored, ``instances`` (H, W) uint16 (or None for a row without instances).
    """
    _, fs, paths = _split_shards(uri, split, storage_options)
    for path in paths:
        parquet = pq.ParquetFile(fs.open_input_file(path))
        has_instances = "instances" in parquet.schema_arrow.names
        for batch in parquet.iter_batches(batch_size=32):
            data = batch.to_pydict()
            for index in range(batch.num_rows):
                sample: dict[str, Any] = {
                    "id": data["id"][index],
                    "image": decode_image(data["image"][index], channels),
                    "mask": decode_mask(data["mask"][index]),
                }
                if has_instances:
                    raw = data["instances"][index]
                    sample["instances"] = None if raw is None else decode_mask(raw)
                yield sample


def split_directory(uri: str, split: str, storage_options: dict[str, Any] | None = None) -> str:
    """The path of a split's directory inside the filesystem of ``resolve(uri)``."""
    _, path = dio.resolve(str(uri), storage_options)
    return posixpath.join(path, split)
