"""A split's rows, read where they are used.

**Index.** ``open_split`` reads the split's Parquet *footers* (row count and row-group sizes of
each shard), never its rows, into a ``SplitIndex``: a small picklable value that names the
dataset URI, the shards and where each row lives. A row's *index* is its position in the split
(shards in name order, rows in stored order), as before any reader sees it. The driver of a
training run builds the index; no row data passes through the driver or its object store.

**Rows.** A process that decodes rows (a training worker scoring validation rows, a decoding
task) asks a ``RowReader`` for rows by index. The reader reads the *row group* that holds a row
straight from the dataset URI (local path, ``file://`` or ``s3://``, with only the columns it
needs) and keeps it in the process's ``RowGroupCache``: bounded in bytes (``CACHE_BYTES``,
least recently used out first). Ray reuses its worker processes for tasks, so a decoding
process's cache outlives the task that filled it: a split that fits in the cache is read from
its source once per process, and a larger one is read group by group as the epoch's order needs
it. Datasets written by ``DatasetWriter`` have row groups of about ``format.ROW_GROUP_BYTES``,
so reading one row reads at most that much.

Parquet footers and row groups: https://arrow.apache.org/docs/python/parquet.html
(``ParquetFile.metadata``, ``ParquetFile.read_row_group``).
"""

from __future__ import annotations

import bisect
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from segplatform.data import io as dio
from segplatform.data.format import DatasetError, check_schema, shard_files

__all__ = [
    "CACHE_BYTES",
    "COLUMNS",
    "RowGroupCache",
    "RowReader",
    "ShardInfo",
    "SplitIndex",
    "open_split",
    "read_split_tables",
]

COLUMNS = ("id", "image", "mask", "instances")
CACHE_BYTES = 512 << 20  # row-group bytes one process keeps (per process, all splits)


@dataclass(frozen=True)
class ShardInfo:
    """One shard: its path on the dataset's filesystem and where its row groups start."""

    path: str
    rows: int
    groups: tuple[int, ...]  # the first row of each row group (within the shard)
    version: str = ""  # size and modification time when indexed: a rewritten shard is another

    def group_of(self, row: int) -> tuple[int, int]:
        """``(row group, row within the group)`` of a row of the shard."""
        group = bisect.bisect_right(self.groups, row) - 1
        return group, row - self.groups[group]


@dataclass(frozen=True)
class SplitIndex:
    """Where each row of one split lives (module docstring): no row data."""

    uri: str  # the dataset URI
    split: str
    shards: tuple[ShardInfo, ...]
    offsets: tuple[int, ...]  # split index of each shard's first row
    rows: int  # rows in the split
    columns: tuple[str, ...]  # the columns readers read (those the shards have)
    storage_options: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def source(self) -> str:
        """``<dataset URI> split '<split>'``, for messages."""
        return f"{self.uri} split {self.split!r}"

    def locate(self, index: int) -> tuple[int, int]:
        """``(shard, row in shard)`` of a split index."""
        if not 0 <= index < self.rows:
            raise IndexError(f"{self.source}: row index {index} outside 0..{self.rows - 1}")
        shard = bisect.bisect_right(self.offsets, index) - 1
        return shard, index - self.offsets[shard]

    def shard_name(self, shard: int) -> str:
        """The shard's location, for messages."""
        return dio.display_uri(self.uri, self.shards[shard].path)


def open_split(
    uri: str,
    split: str,
    storage_options: dict[str, Any] | None = None,
    *,
    expected_rows: int | None = None,
    columns: Sequence[str] = COLUMNS,
) -> SplitIndex:
    """The index of a split from its shards' footers, checked against the format.

    DatasetError names the shard when its footer cannot be read or it lacks a column, and the
    split when its shards do not hold ``expected_rows`` rows (the manifest's count).
    """
    import pyarrow.parquet as pq

    fs, files = shard_files(uri, split, storage_options)
    shards, offsets, start = [], [], 0
    present: set[str] = set(columns)
    for file_info in files:
        path = file_info.path
        mtime = file_info.mtime_ns if file_info.mtime is not None else None
        source = dio.display_uri(str(uri), path)
        try:
            with fs.open_input_file(path) as handle:
                file = pq.ParquetFile(handle)
                check_schema(file.schema_arrow, source)
                present &= set(file.schema_arrow.names)
                meta = file.metadata
                groups, first = [], 0
                for group in range(meta.num_row_groups):
                    groups.append(first)
                    first += meta.row_group(group).num_rows
        except (OSError, pa.ArrowException) as err:
            raise DatasetError(f"{source}: cannot read the shard ({err})") from err
        shards.append(ShardInfo(path, first, tuple(groups), f"{file_info.size}:{mtime}"))
        offsets.append(start)
        start += first
    if expected_rows is not None and start != expected_rows:
        raise DatasetError(
            f"{uri}: split {split!r} has {start} rows in its shards but dataset.json says "
            f"{expected_rows}"
        )
    return SplitIndex(
        uri=str(uri),
        split=split,
        shards=tuple(shards),
        offsets=tuple(offsets),
        rows=start,
        columns=tuple(c for c in columns if c in present),
        storage_options=storage_options,
    )


class RowGroupCache:
    """Row groups as Arrow tables, at most ``limit`` bytes, least recently used out first.

    One per process (``RowReader`` shares it); safe to use from several threads.
    """

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self.limit = limit
        self.bytes = 0
        self.reads = 0  # row groups read from the source (a cache miss each) ...
        self.read_bytes = 0  # ... and their bytes (Arrow, as read)
        self._tables: OrderedDict[tuple[Any, ...], pa.Table] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...], read: Any) -> pa.Table:
        with self._lock:
            table = self._tables.get(key)
            if table is not None:
                self._tables.move_to_end(key)
                return table
        table = read()  # outside the lock: another thread may read another group meanwhile
        with self._lock:
            self.reads += 1
            self.read_bytes += table.nbytes
            if key not in self._tables:
                self._tables[key] = table
                self.bytes += table.nbytes
            while self.bytes > self.limit and len(self._tables) > 1:
                _, dropped = self._tables.popitem(last=False)
                self.bytes -= dropped.nbytes
        return table

    def clear(self) -> None:
        with self._lock:
            self._tables.clear()
            self.bytes = 0


_CACHE = RowGroupCache()
_FILESYSTEMS: dict[str, Any] = {}
_FS_LOCK = threading.Lock()


def process_cache() -> RowGroupCache:
    """This process's row-group cache."""
    return _CACHE


def _filesystem(index: SplitIndex) -> Any:
    key = json.dumps([dio.is_s3(index.uri), index.storage_options], sort_keys=True, default=str)
    with _FS_LOCK:
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            fs, _ = dio.resolve(index.uri, index.storage_options)
            _FILESYSTEMS[key] = fs
        return fs


class RowReader:
    """Rows of one split by index, read from the dataset URI through the process's cache."""

    def __init__(self, index: SplitIndex, cache: RowGroupCache | None = None) -> None:
        self.index = index
        self.cache = cache or _CACHE

    def _group(self, shard: int, group: int) -> pa.Table:
        import pyarrow.parquet as pq

        info = self.index.shards[shard]

        def read() -> pa.Table:
            try:
                with _filesystem(self.index).open_input_file(info.path) as handle:
                    file = pq.ParquetFile(handle)
                    meta = file.metadata
                    if meta.num_rows != info.rows or meta.num_row_groups != len(info.groups):
                        raise DatasetError(
                            f"{self.index.shard_name(shard)}: the shard changed after the run "
                            f"indexed it ({meta.num_rows} rows in {meta.num_row_groups} row "
                            f"groups, indexed {info.rows} in {len(info.groups)}); a dataset must "
                            "not be rewritten while a run reads it"
                        )
                    return file.read_row_group(group, columns=list(self.index.columns))
            except (OSError, pa.ArrowException) as err:
                raise DatasetError(
                    f"{self.index.shard_name(shard)}: cannot read row group {group} ({err})"
                ) from err

        key = (self.index.uri, info.path, info.version, group, self.index.columns)
        return self.cache.get(key, read)

    def row(self, index: int) -> dict[str, Any]:
        """The row's values (Python objects) of the index's columns, plus ``name``: where the
        row is, for messages (``<dataset> split '<split>' row <id>``)."""
        shard, row = self.index.locate(int(index))
        group, position = self.index.shards[shard].group_of(row)
        table = self._group(shard, group)
        values = {name: table.column(name)[position].as_py() for name in self.index.columns}
        values["name"] = f"{self.index.source} row {values.get('id', index)}"
        return values

    def rows(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """``row(i)`` for each index."""
        return [self.row(int(i)) for i in indices]


def read_split_tables(
    uri: str,
    split: str,
    storage_options: dict[str, Any] | None = None,
    *,
    columns: Sequence[str] = COLUMNS,
    expected_rows: int | None = None,
) -> list[pa.Table]:
    """The whole split as Arrow tables in this process, one per shard (shards in name order),
    checked like ``open_split``: for plain-loop anchors and tools that want every row at hand."""
    import pyarrow.parquet as pq

    index = open_split(
        uri, split, storage_options, expected_rows=expected_rows, columns=columns
    )
    fs = _filesystem(index)
    tables = []
    for shard, info in enumerate(index.shards):
        try:
            with fs.open_input_file(info.path) as handle:
                tables.append(pq.ParquetFile(handle).read(columns=list(index.columns)))
        except (OSError, pa.ArrowException) as err:
            raise DatasetError(f"{index.shard_name(shard)}: cannot read the shard ({err})") from err
    return tables
