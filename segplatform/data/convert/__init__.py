"""Converters from common layouts to the segplatform dataset format.

Each converter is ``convert_<kind>(src, dest_uri, *, skip_bad=False, overwrite=False,
storage_options=None, **opts) -> ConvertReport``. :data:`CONVERTERS` maps kinds to their import
paths; :func:`get_converter` imports one on demand so that listing them stays cheap. Converters
check the source layout, list their work items and hand them to :func:`write_samples`, which loads,
writes and (with ``skip_bad``) skips each one.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any, TypeVar

from segplatform.data.format import (
    BadSampleError,
    ConvertReport,
    DatasetInfo,
    DatasetWriter,
    Sample,
)

# kind -> "module:function"; modules are imported only when used.
CONVERTERS: dict[str, str] = {
    "folder": "segplatform.data.convert.folder:convert_folder",
    "voc": "segplatform.data.convert.voc:convert_voc",
    "cityscapes": "segplatform.data.convert.cityscapes:convert_cityscapes",
    "coco": "segplatform.data.convert.coco:convert_coco",
}

Item = TypeVar("Item")


def get_converter(kind: str) -> Callable[..., Any]:
    """The converter function for ``kind``; KeyError listing the valid kinds."""
    if kind not in CONVERTERS:
        raise KeyError(f"unknown converter {kind!r}; valid: {', '.join(sorted(CONVERTERS))}")
    module_name, function_name = CONVERTERS[kind].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def progress(
    items: Iterable[Item],
    *,
    total: int | None = None,
    description: str = "converting",
    enabled: bool | None = None,
) -> Iterator[Item]:
    """Iterate ``items`` with a rich progress bar on stderr.

    ``enabled=None`` shows the bar only when stderr is a terminal, so logs and tests stay quiet.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield from items
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


def write_samples(
    dest_uri: str,
    info: DatasetInfo,
    work: Iterable[Item],
    load_sample: Callable[[Item], tuple[str, Sample]],
    *,
    description: str | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    max_shard_bytes: int = 64 << 20,
    show_progress: bool | None = None,
) -> ConvertReport:
    """Write ``load_sample(item) -> (split, sample)`` of every work item to ``dest_uri``.

    An error leaves nothing at the destination; so does a :class:`BadSampleError` (from loading
    or from :meth:`DatasetWriter.add`) unless ``skip_bad=True``, which leaves that sample out and
    lists it in the report's ``skipped`` as (source, reason). The progress bar reads
    ``description`` (default "converting <info.name>") and shows a total when ``work`` has one.
    """
    report = ConvertReport(uri=str(dest_uri))
    with DatasetWriter(
        dest_uri,
        info,
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
        storage_options=storage_options,
    ) as writer:
        for item in progress(
            work,
            total=len(work) if isinstance(work, Sized) else None,
            description=description or f"converting {info.name}",
            enabled=show_progress,
        ):
            try:
                split, sample = load_sample(item)
                writer.add(split, sample)
            except BadSampleError as exc:
                if not skip_bad:
                    raise
                report.skipped.append((exc.source, exc.reason))
        final = writer.close()
    report.rows = dict(final.splits)
    return report
