"""Training with data and checkpoints on S3 (a real SeaweedFS server), across a server restart.

The server is this module's own (not the session one), so that it can be stopped and started
again on the same ports and data directory while two workers train.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
import torch

from segplatform.services import seaweed
from segplatform.services.seaweed import SeaweedServer
from segplatform.train import TrainConfig, run

pytestmark = pytest.mark.slow

BUCKET = "train"


def _restart_on_same_ports(server: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop the server and start it again with the same ports and data directory."""
    ports = [server.ports[name] for name in ("s3", "master", "volume", "filer", "admin")]
    server.stop()
    time.sleep(2)
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
    fs, runs_path = resolve(f"s3://{BUCKET}/runs/s3-run", options)
    deadline = time.monotonic() + 300
    while not _checkpoint_dirs(fs, runs_path):
        assert thread.is_alive(), outcome
        assert time.monotonic() < deadline, "no checkpoint reached S3"
        time.sleep(0.5)
    _restart_on_same_ports(s3, monkeypatch)
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
    assert len(_checkpoint_dirs(fs, runs_path)) >= 2
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
