"""Losing a Serve replica under steady traffic: what clients receive, and for how long.

One process (``python -m segplatform.bench.outage '<json>'``) starts a local Ray and Serve with
the P6 model package (U-Net, 16 base channels, grey input, 4 classes) behind ``segplatform``'s
endpoint with ``replicas`` replicas, and a client that sends the P6 image (a real
``mni152-tissue`` validation slice, PNG) one request after the other on ``clients`` threads.
After ``before_s`` seconds it SIGKILLs one replica process (as a crashed machine would) and
keeps sending until ``after_s`` seconds after the kill. Every answer is recorded: time, status,
``Retry-After``, and client-side failures (a connection error or a timeout: ``status`` 0).

Figures: answers by kind around the kill (200; 503 with ``Retry-After``; anything else, which is a
failure), the time from the kill to the first 200 *sent* after it (the service answers new work
again), and the longest any request waited. Ray Serve replaces a dead replica on its own: its
controller notices the actor died (the actor's process is gone, or a failed health check:
``health_check_period_s`` 10 s, ``health_check_timeout_s`` 30 s by default) and starts a new
one, which loads the package before it takes traffic.

https://docs.ray.io/en/latest/serve/production-guide/fault-tolerance.html
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["OutageSettings", "measure"]


@dataclass(frozen=True)
class OutageSettings:
    data: str  # dataset URI (the image comes from its validation split)
    replicas: int = 1
    clients: int = 2
    before_s: float = 5.0
    after_s: float = 25.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> OutageSettings:
        return cls(**json.loads(text))


def measure(settings: OutageSettings) -> dict[str, Any]:
    import ray
    import requests

    from segplatform.bench.serving import _image, _package
    from segplatform.serve.runner import replica_pids, start_endpoint, stop_endpoint
    from segplatform.serve.settings import ServeSettings
    from segplatform.services.ray_head import free_port

    scratch = Path(tempfile.mkdtemp(prefix="segplatform-bench-outage-"))
    package = _package(scratch, tiny=False)
    body = _image(settings.data)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port, app = free_port(), "bench-outage"
    endpoint = None
    answers: list[tuple[float, float, int, str | None]] = []  # sent, answered, status, RA
    failures: list[str] = []  # what the failed answers were
    try:
        endpoint = start_endpoint(
            ServeSettings(
                model=package,
                num_replicas=settings.replicas,
                num_cpus=1.0,
                torch_threads=1,
                reload_interval_s=0,
            ),
            port=port,
            app_name=app,
        )
        url = f"http://127.0.0.1:{port}/v1/segment?format=png"
        warm = requests.post(url, data=body, headers={"Content-Type": "image/png"}, timeout=60)
        if warm.status_code != 200:
            raise RuntimeError(f"warm-up: HTTP {warm.status_code} {warm.text[:200]}")
        victims = replica_pids(app)
        if len(victims) != settings.replicas:
            raise RuntimeError(f"found {len(victims)} replica process(es), not {settings.replicas}")
        stop = threading.Event()
        lock = threading.Lock()

        def client() -> None:
            session = requests.Session()
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    reply = session.post(
                        url, data=body, headers={"Content-Type": "image/png"}, timeout=60
                    )
                    status, retry = reply.status_code, reply.headers.get("Retry-After")
                    if status != 200 and not (status == 503 and retry):
                        failures.append(f"{status}: {reply.text[:160]}")
                except requests.RequestException as error:
                    status, retry = 0, None
                    failures.append(f"no answer: {type(error).__name__}")
                    session = requests.Session()
                with lock:
                    answers.append((sent, time.monotonic(), status, retry))
                if status != 200:
                    time.sleep(float(retry or 0.2) if status == 503 else 0.2)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(settings.clients)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        time.sleep(settings.before_s)
        killed = time.monotonic()
        os.kill(victims[0], signal.SIGKILL)
        time.sleep(settings.after_s)
        stop.set()
        for thread in threads:
            thread.join(timeout=90)
    finally:
        if endpoint is not None:
            stop_endpoint(endpoint)
        if ray.is_initialized():
            ray.shutdown()
    after = [a for a in answers if a[1] >= killed]  # answered after the kill
    first_ok = min(
        (sent for sent, _, status, _ in after if status == 200 and sent >= killed), default=None
    )
    first_answer = min((done for _, done, status, _ in after if status == 200), default=None)
    kinds = {"200": 0, "503 + Retry-After": 0, "failed": 0}
    for _, _, status, retry in after:
        if status == 200:
            kinds["200"] += 1
        elif status == 503 and retry:
            kinds["503 + Retry-After"] += 1
        else:
            kinds["failed"] += 1
    return {
        "replicas": settings.replicas,
        "requests_before": sum(1 for a in answers if a[1] < killed),
        "answers_after": kinds,
        "first_200_after_kill_s": None if first_ok is None else first_ok - killed,
        "first_200_answered_after_kill_s": (
            None if first_answer is None else first_answer - killed
        ),
        "failures": failures,
        "longest_wait_s": max((done - sent for sent, done, _, _ in after), default=0.0),
        "seconds": time.monotonic() - began,
    }


def main(argv: list[str] | None = None) -> int:
    from segplatform.bench.common import emit_result

    args = list(argv) if argv is not None else sys.argv[1:]
    emit_result(measure(OutageSettings.from_json(args[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
