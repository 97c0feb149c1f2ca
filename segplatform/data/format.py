"""The segplatform dataset format (README "Datasets"): Parquet shards plus a ``dataset.json`` manifest.

A dataset is a directory URI (local path, ``file://`` or ``s3://bucket/prefix``)::

    dataset.json              {"name", "classes", "palette", "ignore_index",
                               "splits": {"train": {"rows": N}, ...}, "version": 1}
    train/part-00000.parquet  columns: id (string), image (binary PNG/JPEG, L or RGB),
    val/part-00000.parquet             mask (binary PNG label map, uint8 or uint16),
                                       height (int32), width (int32),
                                       instances (binary PNG uint16 instance ids, optional)

Masks are 8-bit PNGs when every label fits (``len(classes) <= 255`` and ``ignore_index <= 255``),
16-bit PNGs otherwise. The instance column exists when the first sample written carries instances.

Writes are atomic. :class:`DatasetWriter` writes its shards into a temporary sibling
(``.NAME.tmp-XXXX`` next to the destination); on success a local dataset is published with one
directory rename, an S3 dataset by copying the shards into place and writing ``dataset.json`` last
(a location without ``dataset.json`` is not a dataset). Any exception removes everything written.
An existing dataset is replaced only with ``overwrite=True``. S3 has no atomic directory rename:
the old dataset is copied aside (server side) before it is removed and put back if the new one
cannot be published, so a failed overwrite loses nothing, but readers during the swap find no
``dataset.json`` for a moment.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import uuid
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from segplatform.data import io as dio

MANIFEST_VERSION = 1
MANIFEST_NAME = "dataset.json"
SHARD_PATTERN = "part-{index:05d}.parquet"
# Row groups of about this many bytes: a reader that needs one row reads its row group only
# (segplatform.data.shards), so the group bounds what reading one row costs.
ROW_GROUP_BYTES = 4 << 20
# Column name -> accepted Arrow types. ``instances`` is optional.
REQUIRED_COLUMNS: dict[str, tuple[pa.DataType, ...]] = {
    "id": (pa.string(), pa.large_string()),
    "image": (pa.binary(), pa.large_binary()),
    "mask": (pa.binary(), pa.large_binary()),
    "height": (pa.int32(),),
    "width": (pa.int32(),),
}
OPTIONAL_COLUMNS: dict[str, tuple[pa.DataType, ...]] = {
    "instances": (pa.binary(), pa.large_binary()),
}
IMAGE_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG"})
SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Image modes stored as given; others are converted (and re-encoded as PNG) to the mode listed.
_MODE_CONVERSION: dict[str, str] = {
    "P": "RGB",
    "RGBA": "RGB",
    "RGBX": "RGB",
    "CMYK": "RGB",
    "YCbCr": "RGB",
    "LAB": "RGB",
    "HSV": "RGB",
    "1": "L",
    "LA": "L",
    "PA": "RGB",
}


class DatasetError(ValueError):
    """A bad dataset or bad input; the message names the file, row, field or limit."""


class BadSampleError(DatasetError):
    """One sample is bad; converters may skip it (``--skip-bad``), reporting (source, reason)."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source  # file path(s) the sample came from
        self.reason = reason  # what is wrong with it
        super().__init__(f"{source}: {reason}" if source else reason)


def default_palette(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """The PASCAL VOC colour map (bit-interleaved), extended to any number of classes."""
    colours = []
    for index in range(num_classes):
        red = green = blue = 0
        label = index
        for shift in range(7, -1, -1):
            red |= ((label >> 0) & 1) << shift
            green |= ((label >> 1) & 1) << shift
            blue |= ((label >> 2) & 1) << shift
            label >>= 3
            if label == 0:
                break
        colours.append((red, green, blue))
    return tuple(colours)


@dataclass(frozen=True)
class DatasetInfo:
    """The manifest of a dataset (``dataset.json``)."""

    name: str  # human-readable dataset name
    classes: tuple[str, ...]  # class names; label i is classes[i]
    palette: tuple[tuple[int, int, int], ...]  # one RGB colour per class, for previews and masks
    ignore_index: int = 255  # mask value excluded from losses and metrics (not a class)
    splits: dict[str, int] = field(default_factory=dict)  # rows per split, filled by the writer
    version: int = MANIFEST_VERSION  # manifest format version
    revision: str = ""  # digest of the rows' content ("" in manifests written without one)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "palette", tuple(tuple(c) for c in self.palette))
        object.__setattr__(self, "splits", dict(self.splits))
        if not isinstance(self.name, str) or not self.name:
            raise DatasetError(f"name must be a non-empty string, got {self.name!r}")
        if not self.classes or not all(isinstance(c, str) and c for c in self.classes):
            raise DatasetError(f"classes must be non-empty strings, got {list(self.classes)!r}")
        if len(set(self.classes)) != len(self.classes):
            raise DatasetError(f"classes must be unique, got {list(self.classes)!r}")
        if len(self.classes) > 65535:
            raise DatasetError(f"at most 65535 classes are supported, got {len(self.classes)}")
        if len(self.palette) != len(self.classes):
            raise DatasetError(
                f"palette has {len(self.palette)} colours for {len(self.classes)} classes"
            )
        for index, colour in enumerate(self.palette):
            if len(colour) != 3 or not all(
                isinstance(v, int | np.integer) and 0 <= v <= 255 for v in colour
            ):
                raise DatasetError(f"palette[{index}] must be 3 ints in 0..255, got {colour!r}")
        object.__setattr__(self, "palette", tuple(tuple(int(v) for v in c) for c in self.palette))
        if not isinstance(self.ignore_index, int | np.integer) or not (
            len(self.classes) <= self.ignore_index <= 65535
        ):
            raise DatasetError(
                f"ignore_index must be an int in {len(self.classes)}..65535 (not a class label), "
                f"got {self.ignore_index!r}"
            )
        for split, rows in self.splits.items():
            if not isinstance(split, str) or not SPLIT_NAME.match(split):
                raise DatasetError(f"split name {split!r} must match {SPLIT_NAME.pattern}")
            if not isinstance(rows, int | np.integer) or rows < 0:
                raise DatasetError(f"splits[{split!r}] rows must be an int >= 0, got {rows!r}")

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def mask_dtype(self) -> np.dtype:
        """uint8 when every label and the ignore index fit in 8 bits, uint16 otherwise."""
        return np.dtype(np.uint8 if self.ignore_index <= 255 else np.uint16)

    def to_json(self) -> dict[str, Any]:
        """The manifest as a JSON-ready dict."""
        return {
            "name": self.name,
            "classes": list(self.classes),
            "palette": [list(c) for c in self.palette],
            "ignore_index": int(self.ignore_index),
            "splits": {split: {"rows": int(rows)} for split, rows in self.splits.items()},
            "version": int(self.version),
            **({"revision": self.revision} if self.revision else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> DatasetInfo:
        """Parse a manifest dict read from ``source``; DatasetError names the file and field."""
        if not isinstance(data, dict):
            raise DatasetError(f"{source}: manifest must be a JSON object")
        version = data.get("version")
        if version != MANIFEST_VERSION:
            raise DatasetError(
                f"{source}: unknown manifest version {version!r} "
                f"(this segplatform reads version {MANIFEST_VERSION})"
            )
        for key in ("name", "classes", "palette", "splits"):
            if key not in data:
                raise DatasetError(f"{source}: manifest field {key!r} is missing")
        splits = data["splits"]
        if not isinstance(splits, dict):
            raise DatasetError(f"{source}: field 'splits' must be an object")
        rows: dict[str, int] = {}
        for split, entry in splits.items():
            if not isinstance(entry, dict) or "rows" not in entry:
                raise DatasetError(f"{source}: splits[{split!r}] must be an object with 'rows'")
            rows[split] = entry["rows"]
        try:
            return cls(
                name=data["name"],
                classes=tuple(data["classes"]),
                palette=tuple(tuple(c) for c in data["palette"]),
                ignore_index=data.get("ignore_index", 255),
                splits=rows,
                version=version,
                revision=str(data.get("revision", "")),
            )
        except (TypeError, DatasetError) as exc:
            raise DatasetError(f"{source}: {exc}") from exc


@dataclass
class Sample:
    """One image with its label map, as converters produce it."""

    id: str  # unique within its split
    image: bytes  # encoded PNG or JPEG, RGB or L (other modes are converted to RGB/L PNG)
    mask: np.ndarray  # (H, W) integer class labels; ignore_index marks unlabelled pixels
    instances: np.ndarray | None = None  # (H, W) instance ids, 0 = no instance
    source: str = ""  # file path(s) the sample came from, for error messages


@dataclass
class ConvertReport:
    """What a conversion wrote and what it skipped."""

    uri: str  # destination dataset URI
    rows: dict[str, int] = field(default_factory=dict)  # rows written per split
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason) per bad sample

    @property
    def total_rows(self) -> int:
        """Rows written over all splits."""
        return sum(self.rows.values())


def encode_png(array: np.ndarray) -> bytes:
    """Encode a (H, W) uint8 or uint16 array as a grey PNG (8 or 16 bit)."""
    if array.ndim != 2 or array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected a (H, W) uint8/uint16 array, got {array.dtype} {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _check_image(sample: Sample) -> tuple[bytes, int, int]:
    """Decode the image fully; return (bytes to store, height, width). BadSampleError if bad."""
    if not isinstance(sample.image, bytes | bytearray | memoryview) or len(sample.image) == 0:
        raise BadSampleError(sample.source, "image is empty or not bytes")
    data = bytes(sample.image)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            image.load()  # decodes every pixel: truncated files fail here
            mode = image.mode
            if mode in ("L", "RGB") and image_format in IMAGE_FORMATS:
                return data, image.height, image.width
            target_mode = mode if mode in ("L", "RGB") else _MODE_CONVERSION.get(mode)
            if target_mode is None:
                raise BadSampleError(
                    sample.source,
                    f"unsupported image mode {mode!r} (store 8-bit L or RGB images)",
                )
            converted = image if target_mode == mode else image.convert(target_mode)
            buffer = io.BytesIO()
            converted.save(buffer, format="PNG")
            return buffer.getvalue(), converted.height, converted.width
    except BadSampleError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise BadSampleError(
            sample.source, f"image cannot be decoded ({type(exc).__name__}: {exc})"
        ) from exc


def _check_label_array(
    sample: Sample, array: Any, what: str, height: int, width: int
) -> np.ndarray:
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        shape = getattr(array, "shape", None)
        raise BadSampleError(sample.source, f"{what} must be a (H, W) array, got shape {shape}")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise BadSampleError(sample.source, f"{what} must hold integers, got dtype {array.dtype}")
    if array.shape != (height, width):
        raise BadSampleError(
            sample.source,
            f"image is {width}x{height} (WxH) but {what} is {array.shape[1]}x{array.shape[0]}",
        )
    return array


class DatasetWriter:
    """Writes a dataset atomically; use as a context manager.

    ``add(split, sample)`` validates and buffers samples; full shards are written to a temporary
    location as they fill. Leaving the ``with`` block normally publishes the dataset; leaving it
    with an exception removes everything written and leaves the destination as it was.
    """

    def __init__(
        self,
        uri: str,
        info: DatasetInfo,
        *,
        overwrite: bool = False,
        max_shard_bytes: int = 64 << 20,
        row_group_bytes: int = ROW_GROUP_BYTES,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
        if row_group_bytes <= 0:
            raise ValueError(f"row_group_bytes must be > 0, got {row_group_bytes}")
        self.row_group_bytes = row_group_bytes
        self.uri = str(uri)
        self.info = info
        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self.storage_options = storage_options
        self._fs, self._path = dio.resolve(self.uri, storage_options)
        self._is_local = isinstance(self._fs, pafs.LocalFileSystem)
        self._where = dio.display_uri(self.uri, self._path)
        parent, base = posixpath.split(self._path.rstrip("/"))
        if not base or (not self._is_local and not parent):
            raise DatasetError(
                f"{self.uri}: a dataset needs its own directory (e.g. s3://bucket/name), "
                "not a bucket or filesystem root"
            )
        self._tmp = posixpath.join(parent, f".{base}.tmp-{uuid.uuid4().hex[:12]}")
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._buffered_bytes: dict[str, int] = {}
        self._shards: dict[str, int] = {}
        self._counts: dict[str, int] = {}
        self._digests: dict[str, Any] = {}  # hashlib.sha256 of each split's rows
        self._ids: dict[str, set[str]] = {}
        self._has_instances: bool | None = None
        self._closed = False
        self._check_destination()

    # ----------------------------------------------------------------------------- destination
    def _exists(self, path: str) -> pafs.FileType:
        return self._fs.get_file_info(path).type

    def _list(self, path: str) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
        return self._fs.get_file_info(selector)

    def _check_destination(self) -> None:
        """Refuse to replace anything but an old dataset, and that only with overwrite."""
        kind = self._exists(self._path)
        if kind == pafs.FileType.File:
            raise DatasetError(f"{self._where}: destination is a file, not a directory")
        manifest = self._exists(posixpath.join(self._path, MANIFEST_NAME))
        if manifest == pafs.FileType.File:
            if not self.overwrite:
                raise DatasetError(
                    f"{self._where}: a dataset already exists here (pass overwrite=True / "
                    "--overwrite to replace it)"
                )
            return
        leftovers = [
            info.path
            for info in self._list(self._path)
            if info.type == pafs.FileType.File and not _looks_like_dataset_file(self._path, info)
        ]
        if leftovers:
            raise DatasetError(
                f"{self._where}: destination is not empty and is not a dataset "
                f"(e.g. {leftovers[0]}); choose an empty or new location"
            )
        if not self.overwrite and any(
            info.type == pafs.FileType.File for info in self._list(self._path)
        ):
            raise DatasetError(
                f"{self._where}: destination holds the shards of an unfinished dataset (no "
                f"{MANIFEST_NAME}); pass overwrite=True / --overwrite to replace them"
            )

    # ----------------------------------------------------------------------------- writing
    def add(self, split: str, sample: Sample) -> None:
        """Validate ``sample`` and buffer it for ``split``. BadSampleError names sample.source."""
        if self._closed:
            raise DatasetError(f"{self._where}: writer is closed")
        if not isinstance(split, str) or not SPLIT_NAME.match(split):
            raise DatasetError(f"split name {split!r} must match {SPLIT_NAME.pattern}")
        if not isinstance(sample.id, str) or not sample.id:
            raise BadSampleError(
                sample.source, f"sample id must be a non-empty string, got {sample.id!r}"
            )
        ids = self._ids.setdefault(split, set())
        if sample.id in ids:
            raise BadSampleError(sample.source, f"duplicate id {sample.id!r} in split {split!r}")
        image_bytes, height, width = _check_image(sample)
        mask = _check_label_array(sample, sample.mask, "mask", height, width)
        values = np.unique(mask)
        num_classes = self.info.num_classes
        bad = values[((values < 0) | (values >= num_classes)) & (values != self.info.ignore_index)]
        if bad.size:
            shown = ", ".join(str(int(v)) for v in bad[:10])
            raise BadSampleError(
                sample.source,
                f"mask has label(s) {shown}{' ...' if bad.size > 10 else ''} outside the "
                f"{num_classes} classes 0..{num_classes - 1} "
                f"(ignore_index {self.info.ignore_index})",
            )
        mask_png = encode_png(mask.astype(self.info.mask_dtype))
        instances_png: bytes | None = None
        if sample.instances is not None:
            instances = _check_label_array(sample, sample.instances, "instances", height, width)
            if instances.size and (instances.min() < 0 or instances.max() > 65535):
                raise BadSampleError(
                    sample.source,
                    f"instance ids must be in 0..65535, got {instances.min()}..{instances.max()}",
                )
            instances_png = encode_png(instances.astype(np.uint16))
        if self._has_instances is None:
            self._has_instances = instances_png is not None
        elif instances_png is not None and not self._has_instances:
            raise DatasetError(
                f"{sample.source or sample.id}: sample has instances but the first sample of "
                f"{self._where} had none; give instances for all samples or for none"
            )
        ids.add(sample.id)
        row = {
            "id": sample.id,
            "image": image_bytes,
            "mask": mask_png,
            "height": height,
            "width": width,
            "instances": instances_png,
        }
        self._rows.setdefault(split, []).append(row)
        digest = self._digests.setdefault(split, hashlib.sha256())
        for part in (sample.id.encode(), image_bytes, mask_png, instances_png or b""):
            digest.update(len(part).to_bytes(8, "little") + part)
        size = len(image_bytes) + len(mask_png) + len(instances_png or b"")
        self._buffered_bytes[split] = self._buffered_bytes.get(split, 0) + size
        self._counts[split] = self._counts.get(split, 0) + 1
        if self._buffered_bytes[split] >= self.max_shard_bytes:
            self._flush(split)

    def _schema(self) -> pa.Schema:
        fields = [
            pa.field("id", pa.string(), nullable=False),
            pa.field("image", pa.binary(), nullable=False),
            pa.field("mask", pa.binary(), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            pa.field("width", pa.int32(), nullable=False),
        ]
        if self._has_instances:
            fields.append(pa.field("instances", pa.binary(), nullable=True))
        return pa.schema(fields)

    def _flush(self, split: str) -> None:
        rows = self._rows.get(split)
        if not rows:
            return
        schema = self._schema()
        table = pa.table(
            {name: [row[name] for row in rows] for name in schema.names}, schema=schema
        )
        index = self._shards.get(split, 0)
        per_row = max(1, self._buffered_bytes.get(split, 0) // len(rows))
        directory = posixpath.join(self._tmp, split)
        self._fs.create_dir(directory, recursive=True)
        pq.write_table(
            table,
            posixpath.join(directory, SHARD_PATTERN.format(index=index)),
            filesystem=self._fs,
            compression="none",  # PNG/JPEG bytes do not compress further
            row_group_size=max(1, self.row_group_bytes // per_row),
        )
        self._shards[split] = index + 1
        self._rows[split] = []
        self._buffered_bytes[split] = 0

    def _write_manifest(self, directory: str, info: DatasetInfo) -> None:
        payload = json.dumps(info.to_json(), indent=2).encode()
        with self._fs.open_output_stream(posixpath.join(directory, MANIFEST_NAME)) as stream:
            stream.write(payload)

    def close(self) -> DatasetInfo:
        """Write the remaining shards and publish the dataset; returns the final manifest."""
        if self._closed:
            raise DatasetError(f"{self._where}: writer is already closed")
        self._closed = True
        try:
            if not self._counts:
                raise DatasetError(f"{self._where}: no samples were written; nothing published")
            for split in list(self._rows):
                self._flush(split)
            info = DatasetInfo(
                name=self.info.name,
                classes=self.info.classes,
                palette=self.info.palette,
                ignore_index=self.info.ignore_index,
                splits=dict(self._counts),
                revision=self._revision(),
            )
            if self._is_local:
                self._write_manifest(self._tmp, info)
                self._publish_local()
            else:
                self._publish_copy(info)
            return info
        except BaseException:
            self._remove(self._tmp)
            raise

    def _revision(self) -> str:
        """A digest of the classes and every split's rows in order: two writes of the same
        content share it, a dataset rewritten with other rows (or labels) gets another."""
        total = hashlib.sha256(json.dumps([self.info.classes, self.info.ignore_index]).encode())
        for split in sorted(self._digests):
            total.update(split.encode() + self._digests[split].digest())
        return total.hexdigest()[:16]

    def abort(self) -> None:
        """Remove everything written; the destination is left as it was."""
        self._closed = True
        self._rows.clear()
        self._remove(self._tmp)

    def _remove(self, path: str) -> None:
        try:
            if self._exists(path) != pafs.FileType.NotFound:
                self._fs.delete_dir(path)
        except (OSError, pa.ArrowException):
            pass

    def _publish_local(self) -> None:
        """One rename publishes; an old dataset is moved aside first and removed afterwards."""
        self._check_destination()  # something may have appeared since the writer started
        parent, base = posixpath.split(self._path.rstrip("/"))
        old: str | None = None
        if os.path.isdir(self._path):
            if os.listdir(self._path):
                old = posixpath.join(parent, f".{base}.old-{uuid.uuid4().hex[:12]}")
                os.rename(self._path, old)
            else:
                os.rmdir(self._path)
        try:
            os.rename(self._tmp, self._path)
        except BaseException:
            if old is not None:
                os.rename(old, self._path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _publish_copy(self, info: DatasetInfo) -> None:
        """S3 (no rename): copy an old dataset aside, remove it (manifest first), copy the new
        shards in and write the manifest last. On failure the copied shards are removed and the
        old dataset is put back (manifest last), so nothing is lost; if even that fails, the
        error names the copy aside."""
        self._check_destination()
        backup: str | None = None
        if self._exists(posixpath.join(self._path, MANIFEST_NAME)) == pafs.FileType.File:
            parent, base = posixpath.split(self._path.rstrip("/"))
            backup = posixpath.join(parent, f".{base}.old-{uuid.uuid4().hex[:12]}")
            self._copy_files(self._path, backup, [])
            self._fs.delete_file(posixpath.join(self._path, MANIFEST_NAME))
        if self._exists(self._path) == pafs.FileType.Directory:
            self._fs.delete_dir_contents(self._path, missing_dir_ok=True)
        copied: list[str] = []
        try:
            self._copy_files(self._tmp, self._path, copied)
            self._write_manifest(self._path, info)
        except BaseException as error:
            for target in copied:
                with contextlib.suppress(OSError, pa.ArrowException):
                    self._fs.delete_file(target)
            if backup is not None:
                self._restore(backup, error)
            raise
        self._remove(self._tmp)
        if backup is not None:
            self._remove(backup)

    def _copy_files(self, source: str, target: str, copied: list[str]) -> None:
        """Copy every file below ``source`` to the same place below ``target`` (server side on
        S3), ``dataset.json`` last; appends each written path to ``copied``."""
        files = [info for info in self._list(source) if info.type == pafs.FileType.File]
        files.sort(key=lambda info: posixpath.basename(info.path) == MANIFEST_NAME)
        for file_info in files:
            destination = posixpath.join(target, posixpath.relpath(file_info.path, source))
            self._fs.copy_file(file_info.path, destination)
            copied.append(destination)

    def _restore(self, backup: str, error: BaseException) -> None:
        """Put the old dataset copied to ``backup`` back after a failed replacement."""
        try:
            self._copy_files(backup, self._path, [])
        except BaseException as restore_error:
            raise DatasetError(
                f"{self._where}: replacing the dataset failed ({error}) and so did putting the "
                f"old one back ({restore_error}); the old dataset is kept at "
                f"{dio.display_uri(self.uri, backup)}"
            ) from error
        self._remove(backup)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
            return
        if not self._closed:
            self.close()


def _looks_like_dataset_file(root: str, info: pafs.FileInfo) -> bool:
    """Files a (possibly unfinished) dataset consists of: SPLIT/part-NNNNN.parquet."""
    relative = posixpath.relpath(info.path, root)
    parts = relative.split("/")
    return len(parts) == 2 and bool(re.fullmatch(r"part-\d{5}\.parquet", parts[1]))


def read_manifest(uri: str, storage_options: dict[str, Any] | None = None) -> DatasetInfo:
    """The manifest of the dataset at ``uri``; DatasetError if it is not a dataset."""
    fs, path = dio.resolve(str(uri), storage_options)
    where = dio.display_uri(str(uri), path)
    manifest_path = posixpath.join(path, MANIFEST_NAME)
    kind = fs.get_file_info(manifest_path).type
    if kind != pafs.FileType.File:
        exists = fs.get_file_info(path).type
        if exists == pafs.FileType.NotFound:
            raise DatasetError(f"{where}: not a dataset: the location does not exist")
        raise DatasetError(f"{where}: not a dataset: {MANIFEST_NAME} is missing")
    with fs.open_input_stream(manifest_path) as stream:
        raw = stream.read()
    source = dio.display_uri(str(uri), manifest_path)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{source}: not valid JSON ({exc})") from exc
    return DatasetInfo.from_json(data, source)


def shard_paths(
    uri: str, split: str, storage_options: dict[str, Any] | None = None
) -> tuple[pafs.FileSystem, list[str]]:
    """(filesystem, sorted shard paths) of one split."""
    fs, infos = shard_files(uri, split, storage_options)
    return fs, [info.path for info in infos]


def shard_files(
    uri: str, split: str, storage_options: dict[str, Any] | None = None
) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    """(filesystem, the shards' ``FileInfo`` with size and modification time, by path)."""
    fs, path = dio.resolve(str(uri), storage_options)
    directory = posixpath.join(path, split)
    selector = pafs.FileSelector(directory, recursive=False, allow_not_found=True)
    infos = sorted(
        (
            info
            for info in fs.get_file_info(selector)
            if info.type == pafs.FileType.File and info.path.endswith(".parquet")
        ),
        key=lambda info: info.path,
    )
    return fs, infos


def check_schema(schema: pa.Schema, source: str) -> None:
    """DatasetError if ``schema`` lacks a required column or has one of the wrong type."""
    for name, types in {**REQUIRED_COLUMNS, **OPTIONAL_COLUMNS}.items():
        index = schema.get_field_index(name)
        if index < 0:
            if name in REQUIRED_COLUMNS:
                raise DatasetError(
                    f"{source}: shard is missing column {name!r} "
                    f"(required: {', '.join(REQUIRED_COLUMNS)})"
                )
            continue
        if schema.field(index).type not in types:
            raise DatasetError(
                f"{source}: column {name!r} has type {schema.field(index).type}, "
                f"expected {' or '.join(str(t) for t in types)}"
            )


def validate_dataset(
    uri: str, storage_options: dict[str, Any] | None = None, *, check_samples: bool = False
) -> DatasetInfo:
    """Check the manifest, every shard's columns and the row counts; optionally decode every row.

    With ``check_samples=True`` each image and mask is decoded and checked (sizes, labels).
    """
    info = read_manifest(uri, storage_options)
    for split, expected_rows in info.splits.items():
        fs, paths = shard_paths(uri, split, storage_options)
        where = dio.display_uri(
            str(uri), posixpath.join(dio.resolve(str(uri), storage_options)[1], split)
        )
        if not paths and expected_rows:
            raise DatasetError(
                f"{where}: split {split!r} has no shards but the manifest says {expected_rows} rows"
            )
        rows = 0
        for path in paths:
            source = dio.display_uri(str(uri), path)
            try:
                parquet = pq.ParquetFile(fs.open_input_file(path))
            except (OSError, pa.ArrowException) as exc:
                raise DatasetError(f"{source}: not a readable Parquet file ({exc})") from exc
            check_schema(parquet.schema_arrow, source)
            rows += parquet.metadata.num_rows
            if check_samples:
                _check_shard_samples(parquet, info, source)
        if rows != expected_rows:
            raise DatasetError(
                f"{where}: split {split!r} has {rows} rows but the manifest says {expected_rows}"
            )
    return info


def _check_shard_samples(parquet: pq.ParquetFile, info: DatasetInfo, source: str) -> None:
    row_index = 0
    for batch in parquet.iter_batches(batch_size=64):
        columns = batch.to_pydict()
        for offset in range(batch.num_rows):
            label = f"{source} row {row_index} (id {columns['id'][offset]!r})"
            sample = Sample(
                id=columns["id"][offset],
                image=columns["image"][offset],
                mask=_decode_png(columns["mask"][offset], label),
                source=label,
            )
            _, height, width = _check_image(sample)
            if (height, width) != (columns["height"][offset], columns["width"][offset]):
                raise BadSampleError(label, "height/width columns do not match the image")
            _check_label_array(sample, sample.mask, "mask", height, width)
            values = np.unique(sample.mask)
            bad = values[(values >= info.num_classes) & (values != info.ignore_index)]
            if bad.size:
                raise BadSampleError(label, f"mask has labels {bad[:10].tolist()} outside classes")
            row_index += 1


def _decode_png(data: bytes, source: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return np.array(image)
    except Exception as exc:
        raise BadSampleError(source, f"PNG cannot be decoded ({exc})") from exc
