"""Training with data and checkpoints on S3 (a real SeaweedFS server), across a server restart.

The server is this module's own (not the session one), so that it can be stopped and started
again on the same ports and data directory while two workers train: the run is held after its
step-2 checkpoint (``pause_at_step``; the test waits for the run's marker), the server restarts,
and the run, released, writes its later checkpoints to the restarted server.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
import torch

from segplatform.services import seaweed
from segplatform.services.seaweed import SeaweedServer
from segplatform.train import TrainConfig, run
from segplatform.train.loop import pause_marker, release_pause
from tests.platform_support import open_ports, wait_for

pytestmark = pytest.mark.slow

BUCKET = "train"


def _restart_on_same_ports(server: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop the server and start it again with the same ports and data directory."""
    ports = [server.ports[name] for name in ("s3", "master", "volume", "filer", "admin")]
    server.stop()
    wait_for(lambda: not open_ports(ports), 60, f"the stopped server's ports {ports} stay open")
    queue = iter(ports)
    with monkeypatch.context() as patch:
        patch.setattr(seaweed, "free_port_pair", lambda *a, **k: next(queue))
        server.start(timeout=60)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    server = SeaweedServer(
        tmp_path_factory.mktemp("seaweed-train"),
        access_key="AK" + secrets.token_hex(8).upper(),
        secret_key=secrets.token_urlsafe(24),
    )
    server.start(timeout=60)
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


def _checkpoint_dirs(fs: pafs.FileSystem, run_dir: str) -> list[str]:
    selector = pafs.FileSelector(run_dir, allow_not_found=True)
    try:
        infos = fs.get_file_info(selector)
    except OSError:  # the server is down
        return []
    return sorted(i.base_name for i in infos if i.base_name.startswith("checkpoint_step"))


def test_s3_data_and_checkpoints_survive_a_server_restart(
    ray_cluster: None,
    s3: SeaweedServer,
    shapes_writer: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    tiny_unet: Callable[..., TrainConfig],
) -> None:
    from segplatform.data.io import resolve

    options = s3.storage_options()
    data = f"s3://{BUCKET}/datasets/shapes"
    shapes_writer(data, storage_options=options)
    config = tiny_unet(
        data=data,
        storage_options=options,
        max_iters=6,
        eval_every=2,
        log_every=1,
        storage_path=f"s3://{BUCKET}/runs",
        name="s3-run",
        max_failures=3,
        pause_at_step=2,
        mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment="s3-run",
    )
    # Ray Train keeps each run's train loop config in its state actor (the dashboard's Train
    # view) when state tracking is on: the keys must not be in it.
    monkeypatch.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    outcome: dict[str, Any] = {}

    def train() -> None:
        try:
            outcome["result"] = run(config)
        except BaseException as err:  # reported by the main thread
            outcome["error"] = err

    thread = threading.Thread(target=train)
    thread.start()
    run_uri = f"s3://{BUCKET}/runs/s3-run"

    def held() -> dict[str, Any] | None:
        assert thread.is_alive(), outcome
        return pause_marker(run_uri, 2, options)

    wait_for(held, 300, "the run was not held after its step-2 checkpoint", 0.2)
    _restart_on_same_ports(s3, monkeypatch)
    release_pause(run_uri, 2, options)
    thread.join(timeout=600)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.metrics["step"] == 6
    assert result.checkpoint.path.startswith(f"{BUCKET}/runs/s3-run/checkpoint_step00000006")
    # The checkpoint really is on S3: fetch its training state and weights.
    local = tmp_path / "ckpt"
    result.checkpoint.to_directory(str(local))
    state = torch.load(local / "train_state.pt", weights_only=True)
    assert state["step"] == 6
    assert (local / "model" / "model.safetensors").stat().st_size > 0
    fs, runs_path = resolve(run_uri, options)
    steps = {name[len("checkpoint_step") :][:8] for name in _checkpoint_dirs(fs, runs_path)}
    assert {"00000004", "00000006"} <= steps  # written after the restart
    _assert_credentials_stay_out(options, config, tmp_path)


def _assert_credentials_stay_out(
    options: dict[str, str], config: TrainConfig, tmp_path: Path
) -> None:
    """The S3 keys reach neither the MLflow run's params nor Ray Train's run state."""
    import json

    import ray
    from mlflow.tracking import MlflowClient
    from ray.train.v2._internal.state.state_actor import get_state_actor

    secrets = [options["key"], options["secret"]]
    client = MlflowClient(config.mlflow_uri)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("s3-run").experiment_id])
    params = json.dumps(mlflow_run.data.params)
    assert "train.storage_options" in mlflow_run.data.params and "***" in params
    assert not any(secret in params for secret in secrets)
    runs = ray.get(get_state_actor().get_train_runs.remote())
    state = json.dumps(
        [run.model_dump(mode="json") for run in runs.values() if run.name == "s3-run"],
        default=str,
    )
    assert "s3-run" in state and not any(secret in state for secret in secrets)
