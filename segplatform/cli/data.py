"""``segplatform data``: convert datasets to the Parquet format, inspect them, preview them.

Expected errors (bad dataset or input, missing files, bad storage settings) print one line to
stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from typing import Any

from segplatform.cli import HelpFormatter
from segplatform.data.sources import BUILTIN_SOURCES

CONVERTER_KINDS: tuple[str, ...] = ("folder", "voc", "cityscapes", "coco")
BUILTIN_KINDS: tuple[str, ...] = tuple(BUILTIN_SOURCES)
EXIT_USAGE = 2  # exit status of expected errors
# Kind-specific options: argparse dest -> the converter kinds that take it.
KIND_OPTIONS: dict[str, tuple[str, ...]] = {
    "class_map": ("folder",),
    "classes": ("folder",),
    "images_dir": ("folder",),
    "masks_dir": ("folder",),
    "mask_mode": ("folder",),
    "val_fraction": ("folder",),
    "splits": ("voc", "cityscapes"),
    "annotations": ("cityscapes",),
    "split": ("coco",),
    "skip_empty": ("coco",),
}

CONVERT_EPILOG = """\
Examples:
  segplatform data convert voc ~/data/VOCdevkit ./data/voc --skip-bad
  segplatform data convert voc ~/data/VOCdevkit s3://datasets/voc --splits train,val,trainval \\
      --endpoint-url http://127.0.0.1:8333
  segplatform data convert cityscapes ~/data/cityscapes ./data/cityscapes
  segplatform data convert coco ~/data/coco ./data/coco \\
      --split train=annotations/instances_train2017.json:train2017 \\
      --split val=annotations/instances_val2017.json:val2017
  segplatform data convert folder ./my_images ./data/mine --class-map classes.json
  segplatform data convert mni152-tissue ./data/mni152

Built-in sources (mni152-tissue, colin27-lobes) take only DEST.
S3 settings fall back to AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
AWS_DEFAULT_REGION.
"""
INSPECT_EPILOG = """\
Examples:
  segplatform data inspect ./data/voc
  segplatform data inspect s3://datasets/voc --json > voc.json
"""
PREVIEW_EPILOG = """\
Example:
  segplatform data preview ./data/voc --out grid.png --split val --n 12 --seed 1
"""


def _add_storage_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("S3 (default: the AWS_* environment variables)")
    group.add_argument("--endpoint-url", help="S3 endpoint, e.g. http://127.0.0.1:8333")
    group.add_argument("--access-key", help="S3 access key id")
    group.add_argument("--secret-key", help="S3 secret access key")
    group.add_argument("--region", help="S3 region")


def storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """Explicit S3 options from the command line; None lets the AWS_* variables apply."""
    options = {
        "endpoint_url": args.endpoint_url,
        "key": args.access_key,
        "secret": args.secret_key,
        "region": args.region,
    }
    options = {key: value for key, value in options.items() if value}
    return options or None


def _comma_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data convert|inspect|preview``."""
    data = subparsers.add_parser(
        "data",
        help="convert, inspect and preview datasets",
        description="Convert datasets to the Parquet dataset format, inspect and preview them.",
        formatter_class=HelpFormatter,
        epilog="Examples:\n  segplatform data convert voc ~/data/VOCdevkit ./data/voc\n"
        "  segplatform data inspect ./data/voc\n"
        "  segplatform data preview ./data/voc --out grid.png\n",
    )
    commands = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    convert = commands.add_parser(
        "convert",
        help="convert a dataset layout or a built-in source to the dataset format",
        description="Convert KIND at SRC to a dataset at DEST (local path, file:// or s3://). "
        "A failed conversion leaves nothing at DEST.",
        formatter_class=HelpFormatter,
        epilog=CONVERT_EPILOG,
    )
    convert.add_argument(
        "kind",
        metavar="KIND",
        choices=CONVERTER_KINDS + BUILTIN_KINDS,
        help=f"one of {', '.join(CONVERTER_KINDS + BUILTIN_KINDS)}",
    )
    convert.add_argument(
        "paths",
        metavar="[SRC] DEST",
        nargs="+",
        help="source folder (not for built-in sources) and destination URI",
    )
    convert.add_argument(
        "--skip-bad", action="store_true", help="skip bad samples and list them instead of stopping"
    )
    convert.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    convert.add_argument("--name", help="dataset name in the manifest (default: per kind)")
    convert.add_argument(
        "--max-shard-mb", type=float, default=64.0, help="target size of one Parquet shard in MiB"
    )
    folder = convert.add_argument_group("folder")
    folder.add_argument("--class-map", help="class-map JSON (classes, palette, ignore_index)")
    folder.add_argument("--classes", type=_comma_list, help="class names, comma-separated")
    folder.add_argument("--images-dir", help="explicit images folder (with --masks-dir)")
    folder.add_argument("--masks-dir", help="explicit masks folder (with --images-dir)")
    folder.add_argument(
        "--mask-mode", choices=("auto", "ids", "colors"), help="how masks are read (default auto)"
    )
    folder.add_argument(
        "--val-fraction", type=float, help="put this share of samples (by id hash) in 'val'"
    )
    voc = convert.add_argument_group("voc / cityscapes")
    voc.add_argument(
        "--splits", type=_comma_list, help="splits to convert, comma-separated (default train,val)"
    )
    voc.add_argument(
        "--annotations", help="cityscapes annotation folder: gtFine (default) or gtCoarse"
    )
    coco = convert.add_argument_group("coco")
    coco.add_argument(
        "--split",
        action="append",
        metavar="NAME=JSON:IMAGE_DIR",
        help="a split: instances JSON and image folder, relative to SRC "
        "(repeat; default: annotations/instances_*.json)",
    )
    coco.add_argument(
        "--skip-empty", action="store_true", help="leave out images without annotations"
    )
    _add_storage_options(convert)
    convert.set_defaults(func=_run_convert, parser=convert)

    inspect = commands.add_parser(
        "inspect",
        help="classes, splits, sizes and class pixel frequencies of a dataset",
        description="Summarise a dataset: classes, splits, rows, image sizes, channels, class "
        "pixel frequencies per split, shards.",
        formatter_class=HelpFormatter,
        epilog=INSPECT_EPILOG,
    )
    inspect.add_argument("uri", metavar="URI", help="dataset location (path, file:// or s3://)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_storage_options(inspect)
    inspect.set_defaults(func=_run_inspect)

    preview = commands.add_parser(
        "preview",
        help="a PNG grid of samples with their masks overlaid",
        description="Write a grid of random samples with colour overlays and a class legend.",
        formatter_class=HelpFormatter,
        epilog=PREVIEW_EPILOG,
    )
    preview.add_argument("uri", metavar="URI", help="dataset location (path, file:// or s3://)")
    preview.add_argument("--out", required=True, help="output PNG path")
    preview.add_argument("--split", default="train", help="split to sample from")
    preview.add_argument("--n", type=int, default=8, help="number of samples")
    preview.add_argument("--seed", type=int, default=0, help="random seed of the sample choice")
    preview.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    _add_storage_options(preview)
    preview.set_defaults(func=_run_preview)


def _expected_errors() -> tuple[type[BaseException], ...]:
    from segplatform.data.format import DatasetError
    from segplatform.data.io import StorageError

    return (DatasetError, StorageError, OSError)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _guarded(run: Any, args: argparse.Namespace) -> int:
    try:
        return run(args)
    except _expected_errors() as exc:
        if isinstance(exc, OSError) and exc.filename and exc.strerror:
            return _fail(f"{exc.filename}: {exc.strerror}")
        return _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def _run_convert(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    builtin = args.kind in BUILTIN_KINDS
    expected = 1 if builtin else 2
    if len(args.paths) != expected:
        want = "only DEST" if builtin else "SRC and DEST"
        parser.error(f"{args.kind} takes {want}, got {len(args.paths)} path(s)")
    for dest, kinds in KIND_OPTIONS.items():
        value = getattr(args, dest)
        if value not in (None, False) and args.kind not in kinds:
            option = "--" + dest.replace("_", "-")
            parser.error(f"{option} applies to {', '.join(kinds)}, not {args.kind}")
    if args.max_shard_mb <= 0:
        parser.error(f"--max-shard-mb must be > 0, got {args.max_shard_mb}")
    opts: dict[str, Any] = {}
    if args.kind == "coco" and args.split:
        from segplatform.data.convert.coco import split_specs

        try:
            opts["splits"] = split_specs(args.split)
        except ValueError as exc:
            parser.error(str(exc))
    return _guarded(lambda a: _convert(a, opts), args)


def _convert(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    options = storage_options(args)
    max_shard_bytes = int(args.max_shard_mb * (1 << 20))
    dest = args.paths[-1]
    if args.kind in BUILTIN_KINDS:
        report = _convert_builtin(args, dest, options, max_shard_bytes)
    else:
        from segplatform.data.convert import get_converter

        if args.name:
            opts["name"] = args.name
        for dest_name in KIND_OPTIONS:
            value = getattr(args, dest_name)
            if dest_name != "split" and value not in (None, False) and dest_name not in opts:
                opts[dest_name] = value
        converter = get_converter(args.kind)
        report = converter(
            args.paths[0],
            dest,
            skip_bad=args.skip_bad,
            overwrite=args.overwrite,
            storage_options=options,
            max_shard_bytes=max_shard_bytes,
            **opts,
        )
    rows = ", ".join(f"{split} {count}" for split, count in report.rows.items())
    print(f"wrote {dest}: {report.total_rows} rows ({rows})")
    if report.skipped:
        print(f"skipped {len(report.skipped)} bad sample(s):", file=sys.stderr)
        for source, reason in report.skipped:
            print(f"  {source}: {reason}", file=sys.stderr)
    return 0


def _convert_builtin(
    args: argparse.Namespace, dest: str, options: dict[str, Any] | None, max_shard_bytes: int
) -> Any:
    from segplatform.data.convert import progress
    from segplatform.data.format import (
        BadSampleError,
        ConvertReport,
        DatasetError,
        DatasetWriter,
    )
    from segplatform.data.sources import BUILTIN_SOURCES

    if args.kind not in BUILTIN_SOURCES:
        raise DatasetError(
            f"built-in source {args.kind!r} is not available here "
            f"(available: {sorted(BUILTIN_SOURCES) or 'none'})"
        )
    info, samples = BUILTIN_SOURCES[args.kind]()
    if args.name:
        info = replace(info, name=args.name)
    report = ConvertReport(uri=dest)
    with DatasetWriter(
        dest,
        info,
        overwrite=args.overwrite,
        max_shard_bytes=max_shard_bytes,
        storage_options=options,
    ) as writer:
        for split, sample in progress(samples, description=f"converting {info.name}"):
            try:
                writer.add(split, sample)
            except BadSampleError as exc:
                if not args.skip_bad:
                    raise
                report.skipped.append((exc.source, exc.reason))
        final = writer.close()
    report.rows = dict(final.splits)
    return report


def _run_inspect(args: argparse.Namespace) -> int:
    def run(args: argparse.Namespace) -> int:
        from segplatform.data.inspect import inspect_dataset, render_inspection

        report = inspect_dataset(args.uri, storage_options(args))
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            render_inspection(report)
        return 0

    return _guarded(run, args)


def _run_preview(args: argparse.Namespace) -> int:
    if args.n < 1:
        return _fail(f"--n must be >= 1, got {args.n}")

    def run(args: argparse.Namespace) -> int:
        from segplatform.data.inspect import preview_dataset

        result = preview_dataset(
            args.uri,
            os.path.expanduser(args.out),
            split=args.split,
            n=args.n,
            seed=args.seed,
            storage_options=storage_options(args),
            alpha=args.alpha,
        )
        width, height = result["size"]
        print(
            f"wrote {result['path']} ({width}x{height}, {len(result['ids'])} samples: "
            f"{', '.join(result['ids'])})"
        )
        return 0

    return _guarded(run, args)
