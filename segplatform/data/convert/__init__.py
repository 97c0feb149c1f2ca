"""Converters from common layouts to the segplatform dataset format.

Each converter is ``convert_<kind>(src, dest_uri, *, skip_bad=False, overwrite=False,
storage_options=None, **opts) -> ConvertReport``. :data:`CONVERTERS` maps kinds to their import
paths; :func:`get_converter` imports one on demand so that listing them stays cheap.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

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
