"""Acceptance (issue 5): the MLflow server dies while two Ray Train workers train.

A real ``mlflow server`` (``MLflowServer``, SQLite, artifacts on disk) on a fixed loopback port
serves the module. Each test trains a tiny U-Net with ``segplatform.train.run`` on the session's
local Ray cluster and SIGKILLs the server once the run's first metrics have reached it:

- the server comes back on the same port and store while the run goes on: training completes,
  every metric logged during the outage reaches MLflow (no step missing, none twice), the run ends
  FINISHED, and the worker's warning about the unreachable server is in its log;
- the server stays down until after the run: training still ends, because the trackers stop
  waiting for a server that does not answer (their warning says so: "unreachable (no answer for
  N s)", not "did not take every record within"), the records stay in the tracking buffers with
  a message naming ``segplatform tracking sync``, and that command uploads them once the server
  is back (metrics, the FINISHED status and the registered model version).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from segplatform.services.mlflow_server import MLflowServer
from segplatform.services.ray_head import free_port, port_is_open
from segplatform.tracking import pending_records
from segplatform.train import TrainConfig, run

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
# Evaluation and training-metric period. Each ``ray.train.report`` can wait up to 2 s for Ray
# Train's controller (it polls workers every 2 s and takes one result per worker at a time), so
# the tests report every other iteration only.
EVAL_EVERY = 2
# Iterations of the run whose server comes back: enough to go on after the restart.
RESTART_ITERS = 20
# Iterations of the run whose server stays down.
DOWN_ITERS = 8


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MLflowServer]:
    server = MLflowServer(tmp_path_factory.mktemp("mlflow-outage"), port=free_port())
    server.start(timeout=120)
    try:
        yield server
    finally:
        server.stop()


def _kill(server: MLflowServer) -> None:
    """SIGKILL the whole server (no graceful shutdown), as a crashed machine would."""
    assert server.pid is not None
    os.killpg(server.pid, signal.SIGKILL)
    server.stop(timeout=5)  # reaps the process, closes its log
    assert not port_is_open(server.host, server.port)


def _restart(server: MLflowServer, port: int) -> None:
    """Start the server again on the same port, database and artifact store."""
    server.start(timeout=120)
    assert server.port == port


def _config(
    tiny_unet: Callable[..., TrainConfig],
    server: MLflowServer,
    shapes_dataset: str,
    storage: str,
    name: str,
    max_iters: int,
) -> TrainConfig:
    return tiny_unet(
        data=shapes_dataset,
        max_iters=max_iters,
        eval_every=EVAL_EVERY,
        log_every=EVAL_EVERY,
        keep_checkpoints=1,
        storage_path=storage,
        name=name,
        overlay_samples=1,
        mlflow_uri=server.tracking_uri,
        experiment=name,
        register_as=name,
    )


class _Training:
    """``run(config)`` in a thread; ``result`` or ``error`` once it ended."""

    def __init__(self, config: TrainConfig) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(config,), daemon=True)
        self.thread.start()

    def _run(self, config: TrainConfig) -> None:
        try:
            self.result = run(config)
        except BaseException as err:  # re-raised by the test
            self.error = err

    def join(self, timeout: float) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"training still running after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.result


def _wait_for_first_metrics(server: MLflowServer, experiment: str, training: _Training) -> str:
    """The run id, once its first training metric is on the server."""
    client = MlflowClient(server.tracking_uri)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert training.thread.is_alive(), f"training ended early: {training.error!r}"
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id]) if found else []
        if runs and client.get_metric_history(runs[0].info.run_id, "loss"):
            return runs[0].info.run_id
        time.sleep(0.3)
    raise AssertionError("no metric reached MLflow within 240 s")


def _buffers(name: str) -> list[Path]:
    """The tracking buffers of run ``name`` (one per tracker: the rank-0 worker, the driver)."""
    root = Path(os.environ["SEGPLATFORM_TRACKING_BUFFER"]) / name
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if (p / "records.jsonl").exists())


def _recorded_steps(name: str, metric: str) -> list[int]:
    """Steps of the ``metric`` records the worker's tracker wrote to its buffer so far."""
    steps = []
    for buffer in _buffers(name):
        for line in (buffer / "records.jsonl").read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # empty, or being written right now
                continue
            if record["op"] == "metrics" and metric in record["args"]["metrics"]:
                steps.append(record["args"]["step"])
    return sorted(steps)


def _wait_until(condition: Any, timeout: float, what: str, training: _Training) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert training.thread.is_alive() or condition(), f"training ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _worker_log_text() -> str:
    """Everything the Ray workers of this session wrote to their log files."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return "\n".join(
        path.read_text(errors="replace")
        for path in logs.glob("worker-*")
        if path.suffix in (".out", ".err")
    )


def _assert_complete_and_finished(server: MLflowServer, name: str, max_iters: int) -> str:
    """The run of ``name`` holds every step's metrics once, is FINISHED, and none is RUNNING."""
    client = MlflowClient(server.tracking_uri)
    experiment_id = client.get_experiment_by_name(name).experiment_id
    runs = client.search_runs([experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # a resumed tracker reuses the run
    run_id = runs[0].info.run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.search_runs([experiment_id], "attributes.status = 'RUNNING'") == []
    every_step = list(range(EVAL_EVERY, max_iters + 1, EVAL_EVERY))
    for metric in ("loss", "val_miou", "val_pixel_acc"):
        steps = [m.step for m in client.get_metric_history(run_id, metric)]
        assert sorted(steps) == every_step, (metric, steps)
    params = client.get_run(run_id).data.params
    assert params["train.name"] == name and params["plan.world_size"] == "2"
    version = client.get_model_version_by_alias(name, "champion")
    assert version.run_id == run_id and version.tags["ray_run_name"] == name
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"model", "eval", "overlays"} <= artifacts, artifacts
    return run_id


def test_metrics_logged_during_an_outage_reach_mlflow_after_restart(
    ray_cluster: None,
    mlflow_server: MLflowServer,
    shapes_dataset: str,
    tmp_path: Path,
    tiny_unet: Callable[..., TrainConfig],
) -> None:
    name = "outage-restart"
    port = mlflow_server.port
    storage = str(tmp_path / "runs")
    training = _Training(
        _config(tiny_unet, mlflow_server, shapes_dataset, storage, name, RESTART_ITERS)
    )
    _wait_for_first_metrics(mlflow_server, name, training)
    _kill(mlflow_server)
    killed_after = max(_recorded_steps(name, "loss"))
    # Keep the server down until at least two evaluations were recorded during the outage.
    _wait_until(
        lambda: len([s for s in _recorded_steps(name, "val_miou") if s > killed_after]) >= 2,
        240,
        "two evaluations during the outage",
        training,
    )
    during_outage = [s for s in _recorded_steps(name, "val_miou") if s > killed_after]
    _restart(mlflow_server, port)
    result = training.join(timeout=300)
    assert result.metrics["step"] == RESTART_ITERS

    run_id = _assert_complete_and_finished(mlflow_server, name, RESTART_ITERS)
    client = MlflowClient(mlflow_server.tracking_uri)
    on_server = {m.step for m in client.get_metric_history(run_id, "val_miou")}
    assert set(during_outage) <= on_server
    # Everything was delivered by the trackers themselves: nothing is left to sync.
    for buffer in _buffers(name):
        assert pending_records(buffer) == [], buffer
    logs = _worker_log_text()
    assert f"MLflow at {mlflow_server.tracking_uri} unreachable" in logs
    assert f"MLflow at {mlflow_server.tracking_uri} is reachable again" in logs


def test_server_down_until_after_the_run_then_tracking_sync(
    ray_cluster: None,
    mlflow_server: MLflowServer,
    shapes_dataset: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    tiny_unet: Callable[..., TrainConfig],
) -> None:
    caplog.set_level(logging.WARNING, logger="segplatform.tracking")
    name = "outage-until-end"
    port = mlflow_server.port
    storage = str(tmp_path / "runs")
    training = _Training(
        _config(tiny_unet, mlflow_server, shapes_dataset, storage, name, DOWN_ITERS)
    )
    _wait_for_first_metrics(mlflow_server, name, training)
    _kill(mlflow_server)
    result = training.join(timeout=400)
    assert result.metrics["step"] == DOWN_ITERS

    # The records wait in the buffers of the rank-0 worker and of the driver (which logs and
    # registers the best checkpoint), and each says how to upload them.
    buffers = _buffers(name)
    pending = {buffer: pending_records(buffer) for buffer in buffers}
    ends = [r for records in pending.values() for r in records if r["op"] == "end"]
    assert [r["args"]["status"] for r in ends] == ["FINISHED", "FINISHED"]  # worker, driver
    assert any(r["op"] == "register" for records in pending.values() for r in records)
    kept_steps = {r["args"]["step"] for rs in pending.values() for r in rs if r["op"] == "metrics"}
    assert DOWN_ITERS in kept_steps
    (driver_buffer,) = [b for b in buffers if b.name.startswith("driver-")]
    (worker_buffer,) = [b for b in buffers if b.name.startswith("worker-")]
    # Both trackers gave up on a server that did not answer; neither waited out its timeout.
    gave_up = f"MLflow at {mlflow_server.tracking_uri} is unreachable (no answer for"
    assert gave_up in caplog.text, caplog.text
    assert f"upload them with `segplatform tracking sync {driver_buffer}`" in caplog.text
    logs = _worker_log_text()
    assert f"MLflow at {mlflow_server.tracking_uri} unreachable" in logs
    assert gave_up in logs
    assert f"upload them with `segplatform tracking sync {worker_buffer}`" in logs
    assert "did not take every record within" not in caplog.text + logs

    _restart(mlflow_server, port)
    for buffer in buffers:
        sync = subprocess.run(
            [str(VENV_BIN / "segplatform"), "tracking", "sync", str(buffer)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sync.returncode == 0, sync.stdout + sync.stderr
        assert f"sent {len(pending[buffer])} record(s)" in sync.stdout
        assert pending_records(buffer) == []
    _assert_complete_and_finished(mlflow_server, name, DOWN_ITERS)
