"""P6: the Serve endpoint over HTTP against in-process inference, and batched against unbatched.

One process (``python -m segplatform.bench.serving '<json>'``) starts a local Ray and Serve with
two applications of the same model package (the main job's network: U-Net, 16 base channels,
grey input, 4 classes; random weights): ``/u`` unbatched and ``/b`` with dynamic batching (up to
8 images, 10 ms wait), one replica each, one torch thread each (the CPU default of a 1-CPU
replica), ``max_inflight`` raised to 16 so that concurrency 8 is admitted. The image is a real
validation slice of ``mni152-tissue`` sent as PNG; answers are ``format=png`` label maps.

Per repeat, interleaved:

- **in-process**: ``segplatform.evaluate.segment_image`` on the decoded image, one torch thread,
  ``requests`` one after the other: median latency;
- **HTTP, concurrency 1**: the same image POSTed to ``/u`` one request at a time (a kept-alive
  connection): median latency. Added latency = HTTP median − in-process median (decode, PNG
  encode, HTTP proxy, Serve routing);
- **Serve's floor**: the same body POSTed to a third application, an echo FastAPI ingress
  that does no work: what any Serve HTTP endpoint costs on this machine;
- **concurrency 8**, unbatched ``/u`` and batched ``/b``: 8 client threads send ``requests``
  requests in all; images per second.
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["ServeBenchSettings", "measure"]


@dataclass(frozen=True)
class ServeBenchSettings:
    data: str  # dataset URI (a validation image is taken from it)
    repeats: int = 3
    requests: int = 30  # per latency window
    concurrent_requests: int = 48  # per throughput window
    concurrency: int = 8
    warmup_requests: int = 8
    replica_threads: int = 1
    tiny: bool = False  # the U-Net's tiny config instead of 16 base channels

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _package(directory: Path, tiny: bool) -> str:
    import torch

    import architectures
    from segplatform.package import save_package

    params = {"padding": "same", "in_channels": 1, "num_classes": 4}
    config_class = architectures.config_class("unet")
    config = config_class.tiny(**params) if tiny else config_class(**params, base_channels=16)
    torch.manual_seed(0)
    model = architectures.build_from_config("unet", config).eval()
    return save_package(
        directory / "unet",
        model,
        "unet",
        config,
        classes=["background", "grey matter", "white matter", "other brain"],
        palette=[(0, 0, 0), (230, 159, 0), (86, 180, 233), (0, 158, 115)],
        normalization={"mean": [0.5], "std": [0.25]},
    )


def _image(data: str) -> bytes:
    from segplatform.data.shards import read_split_tables

    (table, *_) = read_split_tables(data, "val", columns=("id", "image", "mask"))
    return table.column("image")[table.num_rows // 2].as_py()


def measure(settings: ServeBenchSettings) -> dict[str, Any]:
    import numpy as np
    import ray
    import requests
    import torch
    from PIL import Image

    from segplatform.evaluate import segment_image
    from segplatform.package import load_package
    from segplatform.serve.runner import start_endpoint, stop_endpoint
    from segplatform.serve.settings import ServeSettings
    from segplatform.services.ray_head import free_port

    torch.set_num_threads(settings.replica_threads)
    scratch = Path(tempfile.mkdtemp(prefix="segplatform-bench-serve-"))
    package = _package(scratch, settings.tiny)
    body = _image(settings.data)
    image = np.asarray(Image.open(io.BytesIO(body)))
    model, meta = load_package(package)

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    endpoints = []
    try:
        for name, prefix, batching in (("bench-u", "/u", False), ("bench-b", "/b", True)):
            serve_settings = ServeSettings(
                model=package,
                num_cpus=1.0,
                torch_threads=settings.replica_threads,
                batching=batching,
                max_inflight=16,
                reload_interval_s=0,
            )
            endpoints.append(
                start_endpoint(serve_settings, port=port, app_name=name, route_prefix=prefix)
            )
        from ray import serve

        from segplatform.bench.echo_app import echo_app

        serve.run(echo_app(), name="bench-echo", route_prefix="/e")
        base = f"http://127.0.0.1:{port}"
        headers = {"Content-Type": "image/png"}
        session = requests.Session()

        def post(route: str, client: Any = session) -> None:
            response = client.post(
                f"{base}{route}/v1/segment?format=png", data=body, headers=headers, timeout=60
            )
            if response.status_code != 200:
                raise RuntimeError(f"{route}: HTTP {response.status_code} {response.text[:200]}")

        def latencies(fn: Any) -> float:
            times = []
            for _ in range(settings.requests):
                began = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - began))
            return statistics.median(times)

        def throughput(route: str) -> float:
            local = __import__("threading").local()

            def one(_: int) -> None:
                if not hasattr(local, "session"):
                    local.session = requests.Session()
                post(route, local.session)

            with ThreadPoolExecutor(settings.concurrency) as pool:
                began = time.perf_counter()
                list(pool.map(one, range(settings.concurrent_requests)))
                return settings.concurrent_requests / (time.perf_counter() - began)

        arms = {
            "in-process": lambda: latencies(lambda: segment_image(model, meta, image)),
            "http": lambda: latencies(lambda: post("/u")),
            "serve floor": lambda: latencies(lambda: post("/e")),
            "unbatched c8": lambda: throughput("/u"),
            "batched c8": lambda: throughput("/b"),
        }
        for _ in range(settings.warmup_requests):
            segment_image(model, meta, image)
            post("/u")
            post("/b")
            post("/e")
        throughput("/u"), throughput("/b")  # warm-up of the concurrent paths
        results: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(settings.repeats):
            for name, fn in arms.items():
                results[name].append(fn())
    finally:
        for endpoint in endpoints:
            stop_endpoint(endpoint)
        if ray.is_initialized():
            ray.shutdown()
    return {
        "arms": results,
        "image_size": list(image.shape),
        "replica_threads": settings.replica_threads,
    }


def p6(ctx: Any) -> Any:
    from segplatform.bench.common import Comparison, Section, ratios, run_child

    settings = ServeBenchSettings(
        data=ctx.data,
        repeats=ctx.repeats,
        requests=4 if ctx.quick else 30,
        concurrent_requests=8 if ctx.quick else 48,
        warmup_requests=1 if ctx.quick else 8,
        tiny=ctx.quick,
    )
    ctx.step("P6 Serve: two applications, in-process vs HTTP, batched vs unbatched")
    result = run_child(
        "segplatform.bench.serving",
        [settings.to_json()],
        threads=settings.replica_threads,
        timeout=ctx.child_timeout(600),
    )
    arms = result["arms"]
    height, width = result["image_size"][:2]
    tables = [] if ctx.quick else [replica_loss_table(ctx)]
    common = (
        f"U-Net{' (tiny)' if settings.tiny else ' 16'}, {height}×{width} PNG, one replica, "
        f"{settings.replica_threads} torch thread"
    )
    return Section(
        comparisons=[
            Comparison(
                id="P6",
                name="HTTP p50 at concurrency 1",
                ours="POST /v1/segment?format=png, unbatched deployment",
                against="in-process segment_image (same model, same threads)",
                quantity="added median latency, HTTP − in-process",
                unit="ms",
                values=[h - i for h, i in zip(arms["http"], arms["in-process"])],
                arms={"http": arms["http"], "in-process": arms["in-process"]},
                arm_unit="ms (median)",
                target=("<=", 5.0),
                notes=common,
            ),
            Comparison(
                id="P6",
                name="HTTP p50: Serve's own floor",
                ours="POST of the same body to an echo deployment (FastAPI ingress, no work)",
                against="no request at all",
                quantity="median latency of the echo",
                unit="ms",
                values=arms["serve floor"],
                arms={"serve floor": arms["serve floor"]},
                arm_unit="ms (median)",
                notes="the part of the added latency that any Serve HTTP endpoint pays here",
            ),
            Comparison(
                id="P6",
                name="HTTP p50: added by our handler",
                ours="POST /v1/segment?format=png, unbatched deployment",
                against="in-process segment_image plus Serve's floor (echo)",
                quantity="HTTP − in-process − echo",
                unit="ms",
                values=[
                    h - i - e
                    for h, i, e in zip(arms["http"], arms["in-process"], arms["serve floor"])
                ],
                arms={"http": arms["http"], "in-process": arms["in-process"]},
                arm_unit="ms (median)",
                notes="decode, checks, the replica's thread pools, PNG encoding, metrics",
            ),
            Comparison(
                id="P6",
                name="throughput at concurrency 8, batched",
                ours="the deployment with dynamic batching (≤ 8 images, 10 ms wait)",
                against="the same deployment unbatched",
                quantity="images/s, batched / unbatched",
                values=ratios(arms["batched c8"], arms["unbatched c8"]),
                arms={"batched": arms["batched c8"], "unbatched": arms["unbatched c8"]},
                arm_unit="img/s",
                target=(">=", 1.0),
                notes=common + f"; {settings.concurrency} client threads",
            ),
        ],
        tables=tables,
    )


def replica_loss_table(ctx: Any) -> Any:
    """A replica SIGKILLed under steady load, with 1 and with 2 replicas (``bench.outage``):
    what the requests answered after the kill received, and how long the service was gone."""
    from segplatform.bench.common import Table, run_child
    from segplatform.bench.outage import OutageSettings

    rows = []
    for replicas in (1, 2):
        ctx.step(f"P6 replica loss, {replicas} replica(s)")
        found = run_child(
            "segplatform.bench.outage",
            [OutageSettings(data=ctx.data, replicas=replicas).to_json()],
            threads=1,
            timeout=ctx.child_timeout(300),
        )
        kinds = found["answers_after"]
        rows.append(
            [
                replicas,
                kinds["200"],
                kinds["503 + Retry-After"],
                kinds["failed"],
                "; ".join(sorted(set(found["failures"]))) or "-",
                f"{found['first_200_answered_after_kill_s']:.1f}",
                f"{found['longest_wait_s']:.1f}",
            ]
        )
    return Table(
        id="P6",
        title="replica loss: one replica SIGKILLed under steady load (2 client threads)",
        columns=[
            "replicas",
            "200 after the kill",
            "503 + Retry-After",
            "failed",
            "what failed",
            "first 200 after the kill, s",
            "longest wait, s",
        ],
        rows=rows,
        notes=(
            "U-Net 16, the P6 image; 5 s of traffic, the kill, 25 s more. A request executing "
            "on the killed replica is answered by Serve's proxy itself (500, plain text: the "
            "replica's process is gone); requests sent meanwhile wait in Serve's router for a "
            "live replica"
        ),
    )


def main(argv: list[str] | None = None) -> int:
    from segplatform.bench.common import emit_result

    text = (argv if argv is not None else sys.argv[1:])[0]
    emit_result(measure(ServeBenchSettings(**json.loads(text))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
