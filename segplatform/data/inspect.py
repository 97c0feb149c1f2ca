"""Look into a dataset: summary statistics (:func:`inspect_dataset`, :func:`render_inspection`) and
a picture of a few samples with their masks overlaid (:func:`preview_dataset`).

Statistics are computed from the stored columns without decoding images: sizes come from the
``height``/``width`` columns and channels from the image header; masks are decoded to count the
pixels of each class. A progress bar (rich, on stderr) shows when many rows are read.
"""

from __future__ import annotations

import io
import math
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from segplatform.data.format import DatasetError, DatasetInfo, read_manifest, shard_paths
from segplatform.data.reader import decode_image, decode_mask
from segplatform.visualize import IGNORE_STRIPES, overlay

PROGRESS_MIN_ROWS = 200  # show a progress bar when a pass reads at least this many rows
CHANNELS_BY_MODE: dict[str, int] = {"L": 1, "P": 1, "I;16": 1, "LA": 2, "RGB": 3, "RGBA": 4}
TILE = 256  # preview: side of the square each sample is fitted into, in pixels
GAP = 8  # preview: spacing between tiles and around the grid
CAPTION = 16  # preview: height of the caption (sample id) under each tile
SWATCH = 14  # preview: side of a legend colour swatch
LEGEND_ROW = 20  # preview: height of one legend row
LEGEND_COLUMN = 200  # preview: width of one legend column


def _progress_bar(total: int, description: str, enabled: bool | None) -> Any:
    """A rich Progress on stderr, or None when disabled (default: many rows and a terminal)."""
    if enabled is None:
        import sys

        enabled = total >= PROGRESS_MIN_ROWS and sys.stderr.isatty()
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    bar.start()
    bar.add_task(description, total=total)
    return bar


def _iter_rows(
    uri: str,
    split: str,
    columns: Sequence[str],
    storage_options: dict[str, Any] | None,
) -> Iterator[dict[str, Any]]:
    """Rows of one split (only ``columns``), in stored order, undecoded."""
    fs, paths = shard_paths(uri, split, storage_options)
    for path in paths:
        parquet = pq.ParquetFile(fs.open_input_file(path))
        present = [name for name in columns if name in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=64, columns=present):
            data = batch.to_pydict()
            for index in range(batch.num_rows):
                yield {name: data[name][index] for name in present}


def _split_files(uri: str, split: str, storage_options: dict[str, Any] | None) -> tuple[int, int]:
    """(shard count, total bytes) of one split."""
    fs, paths = shard_paths(uri, split, storage_options)
    sizes = [info.size or 0 for info in fs.get_file_info(paths)] if paths else []
    return len(paths), int(sum(sizes))


def inspect_dataset(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    show_progress: bool | None = None,
) -> dict[str, Any]:
    """Summary of the dataset at ``uri`` as a JSON-ready dict.

    Keys: ``uri``, ``name``, ``classes``, ``palette``, ``ignore_index``, ``version``, ``rows``
    (total), ``shards``, ``bytes`` and ``splits``: per split ``rows``, ``shards``, ``bytes``,
    ``image_size`` (``min`` and ``max`` as [height, width] taken per dimension, ``common``: the most
    frequent [height, width] and ``common_count``), ``channels`` ({channels: rows}),
    ``has_instances``, ``class_pixels`` ({class name: pixels}), ``class_frequency`` ({class name:
    share of the labelled pixels}), ``ignore_pixels`` and ``total_pixels``.
    """
    info = read_manifest(uri, storage_options)
    total_rows = sum(info.splits.values())
    bar = _progress_bar(total_rows, f"inspecting {info.name}", show_progress)
    splits: dict[str, Any] = {}
    try:
        for split, expected_rows in info.splits.items():
            splits[split] = _inspect_split(uri, split, info, storage_options, bar)
            if splits[split]["rows"] != expected_rows:
                raise DatasetError(
                    f"{uri}: split {split!r} has {splits[split]['rows']} rows but the manifest "
                    f"says {expected_rows}"
                )
    finally:
        if bar is not None:
            bar.stop()
    return {
        "uri": str(uri),
        "name": info.name,
        "version": info.version,
        "classes": list(info.classes),
        "palette": [list(colour) for colour in info.palette],
        "ignore_index": info.ignore_index,
        "rows": total_rows,
        "shards": sum(entry["shards"] for entry in splits.values()),
        "bytes": sum(entry["bytes"] for entry in splits.values()),
        "splits": splits,
    }


def _inspect_split(
    uri: str,
    split: str,
    info: DatasetInfo,
    storage_options: dict[str, Any] | None,
    bar: Any,
) -> dict[str, Any]:
    shards, size_bytes = _split_files(uri, split, storage_options)
    sizes: Counter[tuple[int, int]] = Counter()
    channels: Counter[int] = Counter()
    bins = max(info.num_classes, info.ignore_index + 1)
    pixels = np.zeros(bins, dtype=np.int64)
    rows = 0
    has_instances = False
    columns = ("id", "image", "mask", "height", "width", "instances")
    for row in _iter_rows(uri, split, columns, storage_options):
        rows += 1
        sizes[(int(row["height"]), int(row["width"]))] += 1
        with Image.open(io.BytesIO(row["image"])) as image:  # header only
            channels[CHANNELS_BY_MODE.get(image.mode, len(image.getbands()))] += 1
        mask = decode_mask(row["mask"])
        pixels += np.bincount(mask.ravel(), minlength=bins)[:bins]
        has_instances = has_instances or row.get("instances") is not None
        if bar is not None:
            bar.advance(bar.task_ids[0])
    class_pixels = {name: int(pixels[index]) for index, name in enumerate(info.classes)}
    labelled = sum(class_pixels.values())
    if sizes:
        common, common_count = sizes.most_common(1)[0]
        image_size: dict[str, Any] = {
            "min": [min(h for h, _ in sizes), min(w for _, w in sizes)],
            "max": [max(h for h, _ in sizes), max(w for _, w in sizes)],
            "common": list(common),
            "common_count": common_count,
        }
    else:
        image_size = {"min": None, "max": None, "common": None, "common_count": 0}
    return {
        "rows": rows,
        "shards": shards,
        "bytes": size_bytes,
        "image_size": image_size,
        "channels": {str(count): rows for count, rows in sorted(channels.items())},
        "has_instances": has_instances,
        "class_pixels": class_pixels,
        "class_frequency": {
            name: (count / labelled if labelled else 0.0) for name, count in class_pixels.items()
        },
        "ignore_pixels": int(pixels[info.ignore_index]) if info.ignore_index < bins else 0,
        "total_pixels": int(pixels.sum()),
    }


def _human_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"


def _size(pair: Sequence[int] | None) -> str:
    return "-" if pair is None else f"{pair[1]}x{pair[0]}"


def render_inspection(report: dict[str, Any], console: Any = None) -> None:
    """Print an :func:`inspect_dataset` report as rich tables (to ``console`` or stdout)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    splits = report["splits"]
    console.print(
        f"[bold]{report['name']}[/bold]  {report['uri']}  (version {report['version']}, "
        f"{len(report['classes'])} classes, ignore index {report['ignore_index']}, "
        f"{report['rows']} rows, {report['shards']} shards, {_human_bytes(report['bytes'])})"
    )
    overview = Table(title="Splits (image sizes as WxH)")
    for column in ("split", "rows", "shards", "size", "min", "max", "most common", "channels"):
        overview.add_column(column, justify="left" if column == "split" else "right")
    for split, entry in splits.items():
        size = entry["image_size"]
        channels = ", ".join(f"{c}ch: {n}" for c, n in entry["channels"].items()) or "-"
        common = _size(size["common"])
        if size["common"] is not None:
            common += f" ({size['common_count']})"
        overview.add_row(
            split,
            str(entry["rows"]),
            str(entry["shards"]),
            _human_bytes(entry["bytes"]),
            _size(size["min"]),
            _size(size["max"]),
            common,
            channels + (", instances" if entry["has_instances"] else ""),
        )
    console.print(overview)
    frequencies = Table(title="Class pixel frequencies (share of labelled pixels)")
    frequencies.add_column("id", justify="right")
    frequencies.add_column("class")
    for split in splits:
        frequencies.add_column(split, justify="right")
    for index, name in enumerate(report["classes"]):
        red, green, blue = report["palette"][index]
        label = Text("■ ", style=f"rgb({red},{green},{blue})") + Text(name)
        cells = [f"{100 * splits[split]['class_frequency'][name]:.2f}%" for split in splits]
        frequencies.add_row(str(index), label, *cells)
    frequencies.add_row(
        str(report["ignore_index"]),
        Text("ignore (share of all pixels)", style="dim"),
        *[
            f"{100 * e['ignore_pixels'] / e['total_pixels']:.2f}%" if e["total_pixels"] else "-"
            for e in splits.values()
        ],
    )
    console.print(frequencies)


def preview_layout(count: int, legend_entries: int) -> dict[str, int]:
    """Grid geometry of a preview of ``count`` samples and ``legend_entries`` legend rows."""
    columns = max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / columns))
    width = columns * TILE + (columns + 1) * GAP
    legend_columns = max(1, (width - GAP) // LEGEND_COLUMN)
    legend_rows = math.ceil(legend_entries / legend_columns) if legend_entries else 0
    height = rows * (TILE + CAPTION) + (rows + 1) * GAP + legend_rows * LEGEND_ROW
    height += GAP if legend_rows else 0
    return {
        "columns": columns,
        "rows": rows,
        "width": width,
        "height": height,
        "legend_columns": legend_columns,
        "legend_rows": legend_rows,
    }


def preview_dataset(
    uri: str,
    out_png: str | os.PathLike[str],
    split: str = "train",
    n: int = 8,
    seed: int = 0,
    *,
    storage_options: dict[str, Any] | None = None,
    alpha: float = 0.5,
) -> dict[str, Any]:
    """Write a PNG grid of ``n`` random samples of ``split`` with their masks overlaid.

    Each sample is fitted into a TILE x TILE square (nearest-neighbour scaling for the mask) and
    captioned with its id; a legend below lists the colour and name of every class that appears
    (and the ignore stripes, if any). The same ``seed`` picks the same samples. Returns
    ``{"path", "size": [width, height], "ids", "classes"}`` (classes shown in the legend).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    info = read_manifest(uri, storage_options)
    if split not in info.splits:
        raise DatasetError(
            f"{uri}: unknown split {split!r}; the dataset has {sorted(info.splits) or 'none'}"
        )
    total = info.splits[split]
    if total == 0:
        raise DatasetError(f"{uri}: split {split!r} is empty")
    chosen = sorted(random.Random(seed).sample(range(total), min(n, total)))
    wanted = set(chosen)
    tiles: list[tuple[str, np.ndarray, np.ndarray]] = []
    for index, row in enumerate(_iter_rows(uri, split, ("id", "image", "mask"), storage_options)):
        if index in wanted:
            tiles.append((row["id"], decode_image(row["image"], 3), decode_mask(row["mask"])))
            if len(tiles) == len(chosen):
                break
    present: set[int] = set()
    for _, _, mask in tiles:
        present.update(int(v) for v in np.unique(mask))
    legend = [index for index in range(info.num_classes) if index in present]
    show_ignore = info.ignore_index in present
    layout = preview_layout(len(tiles), len(legend) + int(show_ignore))
    canvas = Image.new("RGB", (layout["width"], layout["height"]), (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for position, (sample_id, image, mask) in enumerate(tiles):
        row_index, column = divmod(position, layout["columns"])
        left = GAP + column * (TILE + GAP)
        top = GAP + row_index * (TILE + CAPTION + GAP)
        height, width = mask.shape
        scale = TILE / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        shown_image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        mode = "I;16" if mask.dtype == np.uint16 else "L"
        shown_mask = np.asarray(
            Image.fromarray(mask, mode=mode).resize(size, Image.Resampling.NEAREST)
        )
        tile = overlay(
            shown_image, shown_mask, info.palette, alpha=alpha, ignore_index=info.ignore_index
        )
        canvas.paste(Image.fromarray(tile), (left, top))
        draw.text((left, top + TILE + 2), str(sample_id)[:40], fill=(230, 230, 230), font=font)
    legend_top = GAP + layout["rows"] * (TILE + CAPTION + GAP)
    entries = [(tuple(info.palette[i]), f"{i} {info.classes[i]}") for i in legend]
    if show_ignore:
        entries.append((None, f"{info.ignore_index} ignore"))
    for position, (colour, text) in enumerate(entries):
        row_index, column = divmod(position, layout["legend_columns"])
        left = GAP + column * LEGEND_COLUMN
        top = legend_top + row_index * LEGEND_ROW
        box = (left, top, left + SWATCH - 1, top + SWATCH - 1)
        if colour is None:
            draw.rectangle(box, fill=IGNORE_STRIPES[0])
            draw.rectangle(
                (left, top, left + SWATCH // 2 - 1, top + SWATCH - 1), fill=IGNORE_STRIPES[1]
            )
        else:
            draw.rectangle(box, fill=colour, outline=(200, 200, 200))
        draw.text((left + SWATCH + 6, top), text[:28], fill=(230, 230, 230), font=font)
    out_path = Path(out_png)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path, format="PNG")
    return {
        "path": str(out_path),
        "size": [layout["width"], layout["height"]],
        "ids": [sample_id for sample_id, _, _ in tiles],
        "classes": [info.classes[i] for i in legend],
    }
