"""``segplatform bench``: benchmarks measured side by side in one run (see segplatform.bench)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from segplatform.cli import HelpFormatter

# Model settings of the learning benchmark on the built-in grey scans (1 input channel), per
# architecture: the paper's networks cannot train on 2 CPUs in minutes, so these are narrower.
LEARN_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's U-Net at a quarter width (16..256 channels), "same" padding.
    "unet": {"padding": "same", "base_channels": 16, "in_channels": 1},
    # ResNet-18 instead of ResNet-101, 64-wide ASPP; output stride, rates, multi-grid the paper's.
    "deeplab_v3": {"backbone": "resnet18", "aspp_channels": 64, "in_channels": 1},
}

# The built-in datasets of ``bench learn --all`` (segplatform.bench.learning_table.DATASETS).
_DATASETS = ("mni152-tissue", "colin27-lobes")

_EPILOG = """\
Examples:
  segplatform bench learn --arch unet --data mni152-tissue --out bench/
  segplatform bench learn --arch deeplab_v3 --data mni152-tissue --iters 300 --workers 1,2
  segplatform bench learn --arch unet --data ./data/mine --arch-param base_channels=32
  segplatform bench learn --all --out bench/learning --report LEARNING.md
  segplatform bench learn --all --only unet,pspnet --datasets mni152-tissue --report none
"""


def _workers(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,2 — got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected worker counts >= 1, got {text!r}")
    return values


_SUITE_EPILOG = """\
Without a BENCHMARK the suite P1-P9 runs (segplatform.bench.suite): training step against a
plain PyTorch loop (P1), ingest (P2), DeepLab v3 against torchvision (P3), inference path (P4),
ICNet against PSPNet (P5), Serve over HTTP (P6), every architecture (P7), scaling (P8), the
driver against dataset size (P9). Each comparison runs both arms in the same run, interleaved,
repeated, warm-up excluded; the table gives the median ratio and its spread.

Examples:
  segplatform bench --out outputs/bench                    # the suite; BENCHMARKS.md updated
  segplatform bench --quick --out /tmp/bench               # one tiny repetition of each
  segplatform bench --only P1,P8 --repeats 5 --report none
  segplatform bench learn --arch unet --data mni152-tissue
"""


def _ids(text: str) -> tuple[str, ...]:
    from segplatform.bench.suite import BENCHMARKS

    values = tuple(v.strip().upper() for v in text.split(",") if v.strip())
    unknown = [v for v in values if v not in BENCHMARKS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark(s) {','.join(unknown)}; valid: {','.join(BENCHMARKS)}"
        )
    return values


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmarks: the suite P1-P9, learning parity with a plain PyTorch loop",
        description="Benchmarks, each measured side by side in one run.",
        formatter_class=HelpFormatter,
        epilog=_SUITE_EPILOG,
    )
    suite = parser.add_argument_group("the suite (no BENCHMARK)")
    suite.add_argument(
        "--out", dest="suite_out", default="outputs/bench", help="where bench.json/.md go"
    )
    suite.add_argument("--quick", action="store_true", help="one tiny repetition of each")
    suite.add_argument(
        "--only", dest="suite_only", type=_ids, default=(), metavar="P1,P3", help="a subset"
    )
    suite.add_argument("--repeats", type=int, default=None, help="default: 3 (1 with --quick)")
    suite.add_argument(
        "--threads", type=int, default=None, help="torch threads in-process; default: the cores"
    )
    suite.add_argument(
        "--data-root",
        dest="suite_data_root",
        default=None,
        metavar="DIR",
        help="where mni152-tissue is, or is built; default: OUT/data",
    )
    suite.add_argument(
        "--report",
        dest="suite_report",
        default=None,
        metavar="PATH|none",
        help="markdown file whose suite block is replaced; default: BENCHMARKS.md, none with "
        "--quick or --only",
    )
    parser.set_defaults(func=_suite)
    commands = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=False)
    learn = commands.add_parser(
        "learn",
        help="the training service against a plain PyTorch loop: val mIoU curves and ratio",
        description="Train one architecture through the service (1 and 2 workers) and in a plain "
        "PyTorch loop with the same model, seed, optimizer, schedule, total batch and crop "
        "(augmentation off), and report both validation mIoU curves and their ratio.",
        formatter_class=HelpFormatter,
        epilog=_EPILOG,
    )
    learn.add_argument("--arch", default="unet", help="architecture registry name")
    learn.add_argument(
        "--data",
        default="mni152-tissue",
        help="dataset URI, or a built-in dataset name (built under --out/data)",
    )
    learn.add_argument("--out", default="bench", help="where runs, JSON, tables and figures go")
    learn.add_argument("--iters", type=int, default=150, help="optimizer steps")
    learn.add_argument("--eval-every", type=int, default=50, help="iterations between evaluations")
    learn.add_argument("--batch", type=int, default=8, help="total batch (all workers)")
    learn.add_argument("--crop", type=int, default=128, help="square training crop")
    learn.add_argument("--workers", type=_workers, default=(1, 2), help="service worker counts")
    learn.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    learn.add_argument("--lr", type=float, default=1e-3)
    learn.add_argument("--weight-decay", type=float, default=0.01)
    learn.add_argument("--clip-grad-norm", type=float, default=1.0)
    learn.add_argument("--seed", type=int, default=0)
    learn.add_argument("--tiny", action="store_true", help="the architecture's tiny() config")
    learn.add_argument(
        "--arch-param",
        action="append",
        default=[],
        metavar="K=V",
        help="model setting (JSON value; repeatable); default: the preset of --arch",
    )
    table = learn.add_argument_group(
        "--all: the learning table (segplatform.bench.learning_table)",
        "Every jobs/train_<arch>.py as shipped, on every built-in dataset, with only the budget "
        "flags of its architecture (BUDGETS); the --arch/--iters/optimizer options above do not "
        "apply.",
    )
    table.add_argument(
        "--all",
        action="store_true",
        help="run the learning table instead of one parity comparison",
    )
    table.add_argument(
        "--only", default="", metavar="A,B", help="architectures of the table; empty: all"
    )
    table.add_argument(
        "--datasets",
        default=",".join(_DATASETS),
        metavar="A,B",
        help="built-in datasets of the table",
    )
    table.add_argument(
        "--data-root",
        default=None,
        metavar="DIR",
        help="where the built-in datasets are, or are built; none: OUT/data",
    )
    table.add_argument(
        "--report",
        default="LEARNING.md",
        metavar="PATH|none",
        help="markdown report of the table",
    )
    table.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds one job may run before it is stopped"
    )
    learn.set_defaults(func=_learn)


def _suite(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from segplatform.bench.suite import run_suite

    report = args.suite_report
    if report is None:
        report = "none" if args.quick or args.suite_only else "BENCHMARKS.md"
    record = run_suite(
        args.suite_out,
        only=args.suite_only,
        quick=args.quick,
        threads=args.threads,
        repeats=args.repeats,
        data_root=args.suite_data_root,
        report=None if report.lower() == "none" else report,
        command=shlex.join(["segplatform", *sys.argv[1:]]),
    )
    print((Path(args.suite_out) / "bench.md").read_text(), end="")
    if record["errors"]:
        print(f"benchmarks that failed: {', '.join(record['errors'])}")
        return 1
    return 0


def _learn_table(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from segplatform.bench.learning_table import BUDGETS, learning_table

    archs = [a for a in args.only.split(",") if a] or list(BUDGETS)
    unknown = [a for a in archs if a not in BUDGETS]
    if unknown:
        print(f"error: --only {','.join(unknown)}: not among {', '.join(BUDGETS)}")
        return 2
    datasets = [d for d in args.datasets.split(",") if d]
    unknown = [d for d in datasets if d not in _DATASETS]
    if unknown:
        print(f"error: --datasets {','.join(unknown)}: not among {', '.join(_DATASETS)}")
        return 2
    report = None if args.report.lower() == "none" else Path(args.report)
    rows = learning_table(
        args.out,
        archs=archs,
        datasets=datasets,
        data_root=args.data_root,
        report=report,
        command=shlex.join(["segplatform", *sys.argv[1:]]),
        timeout=args.timeout,
    )
    failed = [f"{r.arch}/{r.dataset}" for r in rows if not r.ok]
    if failed:
        print(f"runs that did not end cleanly: {', '.join(failed)}")
    return 1 if failed else 0


def _learn(args: argparse.Namespace) -> int:
    import json

    if args.all:
        return _learn_table(args)

    from segplatform.bench.learn import LearnSettings, learn_parity

    out = Path(args.out)
    data = args.data
    if "/" not in data and not Path(data).exists():  # a built-in dataset name
        from segplatform.data.sources import BUILTIN_SOURCES, convert_builtin

        if data not in BUILTIN_SOURCES:
            print(f"error: --data {data}: not a dataset path nor one of {list(BUILTIN_SOURCES)}")
            return 2
        target = out / "data" / data
        if not (target / "dataset.json").exists():
            convert_builtin(data, str(target))
        data = str(target.resolve())
    params: dict[str, Any] = {}
    for pair in args.arch_param:
        key, _, value = pair.partition("=")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    if not params and not args.tiny:
        params = dict(LEARN_PRESETS.get(args.arch, {}))
    settings = LearnSettings(
        arch=args.arch,
        data=data,
        arch_params=params,
        tiny=args.tiny,
        crop_size=(args.crop, args.crop),
        total_batch=args.batch,
        iters=args.iters,
        eval_every=args.eval_every,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        grad_clip=args.clip_grad_norm,
        seed=args.seed,
        workers=args.workers,
    )
    report = learn_parity(settings, out)
    print((out / f"learn-{args.arch}.md").read_text(), end="")
    for arm in report["service"]:
        print(f"service/plain final val mIoU, {arm['workers']} worker(s): {arm['ratio']:.3f}")
    return 0
