"""Serving a trained, registered model on the local platform with ``segplatform serve``.

The session's single-node platform (``segplatform local up``: Ray head with token auth, MLflow,
S3), left without a Serve application at the end of the module.
A tiny U-Net is trained on the built-in real dataset ``mni152-tissue`` (``segplatform train``,
Ray Train local mode on the platform's Ray) and registered as ``models:/NAME@champion``; the
command ``segplatform serve`` then runs as a user runs it, with only the platform's exports in
its environment (``RAY_ADDRESS`` is the dashboard URL, resolved through the platform's state),
autoscaling between 1 and 2 replicas with short delays and a 1 s alias watch. The tests run in
file order and share that endpoint:

1. end to end: the indexed PNG of a real validation image equals ``segment_image`` of the
   registered version on it; json and overlay work; ``/v1/model`` names version 1;
2. alias move: a second, better version is trained and takes the alias while a client loop runs;
   responses switch to version 2 and no request fails;
3. autoscaling and replica loss: under load the deployment goes to 2 replicas; one replica
   process is killed under load, Serve replaces it and reports 2 running replicas again; no
   request fails around the loss except with a 503 and Retry-After, and every request sent after
   the recovery succeeds; without load it goes back to 1 replica;
4. Ctrl-C stops the command and its application;
5. ``serve deploy deploy/serve.yaml`` (model pinned to a version) serves it, and the same file
   naming another version switches the endpoint to it.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.platform_support import (
    VENV_BIN,
    RunningPlatform,
    clean_env,
    run_cli,
    run_venv,
    wait_for,
)
from tests.serve.conftest import ROOT, free_port, replica_pids

pytestmark = pytest.mark.slow
MODEL = "unet-serve-test"
APP = "segplatform-platform-test"
# The first version: one step at a vanishing learning rate (an untrained network); the second:
# AdamW for long enough to beat it on validation mIoU.
UNTRAINED = {"max_iters": 1, "lr": 1e-6, "name": "untrained"}
TRAINED = {"max_iters": 16, "lr": 0.003, "name": "trained"}


@dataclass
class Served:
    platform: RunningPlatform
    data: str
    url: str
    process: subprocess.Popen
    output: list[str] = field(default_factory=list)

    def model_info(self) -> dict:
        return requests.get(self.url + "v1/model", timeout=10).json()


@pytest.fixture(scope="module")
def platform(single_node_platform: RunningPlatform) -> Iterator[RunningPlatform]:
    """The session's single-node platform; the module leaves no Serve application on it."""
    yield single_node_platform
    env = clean_env(single_node_platform.home, dict(single_node_platform.exports))
    result = run_venv(
        ["serve", "shutdown", "--yes", "--address", env["RAY_ADDRESS"]], env=env, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def trainer(platform: RunningPlatform, tmp_path_factory: pytest.TempPathFactory):
    """``train(**settings)``: one registered training run (``segplatform train --config``, Ray
    Train's local mode, on the platform's Ray and MLflow), returning the registered version;
    the dataset is built once."""
    from segplatform.data.sources import convert_builtin

    base = tmp_path_factory.mktemp("serve-train")
    data = str(base / "mni152-tissue")
    began = time.monotonic()
    convert_builtin("mni152-tissue", data, show_progress=False, stride=8)
    print(f"dataset built in {time.monotonic() - began:.0f} s")
    exports = platform.exports
    env = clean_env(platform.home, dict(exports))

    def train(**settings: object) -> str:
        config = {
            "arch": "unet",
            "tiny": True,
            "arch_params": {"padding": "same"},
            "data": data,
            "crop_size": [64, 64],
            "batch_size": 4,
            "num_workers": 0,
            "optimizer": "adamw",
            "seed": 0,
            "log_every": 8,
            "overlay_samples": 0,
            "storage_path": str(base / "runs"),
            "ray_address": platform.state["services"]["ray_head"]["gcs_address"],
            "mlflow_uri": exports["MLFLOW_TRACKING_URI"],
            "experiment": "serve-tests",
            "register_as": MODEL,
            "promote": "if_better",
            **settings,
        }
        path = base / f"{settings['name']}.json"
        path.write_text(json.dumps(config))
        result = run_cli(["train", "--config", str(path)], env=env, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    train.data = data  # type: ignore[attr-defined]
    return train


@pytest.fixture(scope="module")
def served(platform: RunningPlatform, trainer) -> Iterator[Served]:
    """Version 1 trained and registered, then ``segplatform serve`` on it."""
    began = time.monotonic()
    trainer(**UNTRAINED)
    print(f"first version trained and registered in {time.monotonic() - began:.0f} s")
    began = time.monotonic()
    port = free_port()
    env = clean_env(platform.home, dict(platform.exports))
    command = [
        str(VENV_BIN / "segplatform"),
        "serve",
        "--model",
        f"models:/{MODEL}@champion",
        "--port",
        str(port),
        "--name",
        APP,
        "--autoscale",
        "1:2",
        "--target-ongoing",
        "1",
        "--upscale-delay",
        "1",
        "--downscale-delay",
        "3",
        "--cpus-per-replica",
        "0.5",
        "--max-inflight",
        "8",
        "--reload-interval",
        "1",
        "--set",
        'autoscaling={"look_back_period_s": 2, "metrics_interval_s": 0.5}',
        "--set",
        "torch_threads=1",
    ]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output: list[str] = []
    reader = threading.Thread(
        target=lambda: output.extend(iter(process.stdout.readline, "")), daemon=True
    )
    reader.start()
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(
            lambda: any("Ctrl-C stops it" in line for line in output) or process.poll() is not None,
            240,
            "segplatform serve did not come up",
        )
        assert process.poll() is None, "".join(output)
        assert any(url in line for line in output), "".join(output)
        print(f"segplatform serve answering in {time.monotonic() - began:.0f} s")
        yield Served(platform, trainer.data, url, process, output)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


def validation_png(data: str, index: int = 5) -> bytes:
    import pyarrow.parquet as pq

    table = pq.read_table(next(Path(data, "val").glob("*.parquet")), columns=["image"])
    return table.column("image")[index].as_py()


class ClientLoop:
    """``threads`` threads POSTing one image until stopped, ``pause`` seconds apart; records
    (start time, status, version served). Status 0 is a dropped connection, -503 a 503 without
    the Retry-After header."""

    def __init__(self, url: str, body: bytes, threads: int = 1, pause: float = 0.0) -> None:
        self.url, self.body, self.pause = url + "v1/segment", body, pause
        self.records: list[tuple[float, int, str | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                response = requests.post(
                    self.url,
                    data=self.body,
                    headers={"Content-Type": "image/png"},
                    params={"format": "json"},
                    timeout=60,
                )
                status, version = response.status_code, response.headers.get("X-Model-Version")
                if status == 503 and "Retry-After" not in response.headers:
                    status = -503
            except requests.RequestException:
                status, version = 0, None  # connection dropped
            self.records.append((began, status, version))
            if self.pause:
                self._stop.wait(self.pause)

    def __enter__(self) -> ClientLoop:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)

    def statuses(self) -> list[int]:
        return [status for _, status, _ in self.records]


def test_end_to_end_registered_model(served: Served) -> None:
    from pycocotools import mask as coco_mask

    from segplatform.evaluate import segment_image
    from segplatform.package import load_package

    body = validation_png(served.data)
    with Image.open(io.BytesIO(body)) as image:
        pixels = np.asarray(image)
        size = image.size
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", served.platform.exports["MLFLOW_TRACKING_URI"])
        model, meta = load_package(f"models:/{MODEL}/1")
    expected, _ = segment_image(model, meta, pixels)

    url = served.url + "v1/segment"
    response = requests.post(url, data=body, headers={"Content-Type": "image/png"}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["X-Model-Version"] == "1"
    with Image.open(io.BytesIO(response.content)) as mask:
        assert mask.mode == "P" and mask.size == size
        palette = mask.getpalette()[: 3 * meta.num_classes]
        assert palette == [c for rgb in meta.palette for c in rgb]
        np.testing.assert_array_equal(np.asarray(mask), expected)

    areas = requests.post(
        url, data=body, headers={"Content-Type": "image/png"}, params={"format": "json"}
    ).json()
    assert areas["model"] == {"name": MODEL, "version": "1", "architecture": "unet"}
    assert sum(c["pixels"] for c in areas["classes"]) == size[0] * size[1]
    for entry in areas["masks"]:
        rle = {"size": entry["rle"]["size"], "counts": entry["rle"]["counts"].encode()}
        np.testing.assert_array_equal(coco_mask.decode(rle), expected == entry["id"])

    overlay = requests.post(
        url, data=body, headers={"Content-Type": "image/png"}, params={"format": "overlay"}
    )
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"

    info = served.model_info()
    assert (info["name"], info["version"], info["alias"]) == (MODEL, "1", "champion")
    assert info["classes"] == list(meta.classes) and info["follows_alias"] is True


def test_alias_move_without_failed_requests(served: Served, trainer) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=served.platform.exports["MLFLOW_TRACKING_URI"])
    body = validation_png(served.data)
    with ClientLoop(served.url, body, pause=0.2) as loop:
        began = time.monotonic()
        trainer(**TRAINED)
        print(f"second version trained and registered in {time.monotonic() - began:.0f} s")
        assert client.get_model_version_by_alias(MODEL, "champion").version == "2"
        scores = [float(client.get_model_version(MODEL, v).tags["val_miou"]) for v in "12"]
        assert scores[1] > scores[0], scores
        wait_for(
            lambda: any(version == "2" for _, _, version in loop.records[-3:]),
            60,
            "responses did not come from version 2",
        )
        time.sleep(1)
    statuses = loop.statuses()
    versions = [version for _, _, version in loop.records]
    print(f"alias move: {len(statuses)} requests, versions {versions[0]} -> {versions[-1]}")
    assert set(statuses) == {200}, statuses
    assert versions[0] == "1" and versions[-1] == "2"
    assert served.model_info()["version"] == "2"


def serve_deployment(platform: RunningPlatform) -> dict:
    """The test application's deployment as Serve reports it (the dashboard's REST API, with
    the platform's token): ``status``, ``replicas`` (each with its ``state``), ..."""
    exports = platform.exports
    token = Path(exports["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    reply = requests.get(
        f"{exports['RAY_ADDRESS']}/api/serve/applications/",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    reply.raise_for_status()
    application = reply.json()["applications"].get(APP) or {}
    return application.get("deployments", {}).get("SegmentationService", {})


def test_autoscaling_and_replica_loss(served: Served) -> None:
    body = validation_png(served.data)
    assert len(replica_pids(APP)) == 1
    with ClientLoop(served.url, body, threads=4) as loop:
        began = time.monotonic()
        pids = wait_for(
            lambda: (lambda found: found if len(found) == 2 else None)(replica_pids(APP)),
            120,
            "the deployment did not scale to 2 replicas under load",
        )
        print(f"autoscaling: 2 replicas after {time.monotonic() - began:.1f} s of load")
        wait_for(
            lambda: sum(1 for t, s, _ in loop.records if t > began and s == 200) > 20,
            60,
            "no steady traffic on 2 replicas",
        )
        victim = pids[-1]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        # Serve replaces the lost replica and reports the deployment healthy with both running.
        wait_for(
            lambda: set(replica_pids(APP)) - set(pids),
            120,
            "the killed replica was not replaced",
        )
        seen: list[tuple] = []

        def back_to_two() -> bool:
            deployment = serve_deployment(served.platform)
            states = [replica.get("state") for replica in deployment.get("replicas", [])]
            seen.append((deployment.get("status"), states))
            return deployment.get("status") == "HEALTHY" and states == ["RUNNING", "RUNNING"]

        try:
            wait_for(back_to_two, 120, "the deployment is not back to 2 running replicas")
        except AssertionError as error:
            raise AssertionError(f"{error}; Serve reported {seen[-3:]}") from None
        print(f"replica loss: Serve reported {seen[-1]}")
        healthy_at = time.monotonic()
        wait_for(
            lambda: sum(1 for t, _, _ in loop.records if t > healthy_at) >= 20,
            60,
            "no traffic after the recovery",
        )
    failed = [s for _, s, _ in loop.records if s != 200]
    print(
        f"replica loss: {len(failed)} of {len(loop.records)} requests failed around it "
        f"({sorted(set(failed))})"
    )
    # With a second replica up, a lost one costs no request sent after the loss, or only 503s
    # that say when to retry: never a 500, a dropped connection or a hang (the client's 60 s
    # timeout). A request that was executing on the killed replica gets Serve's proxy's own
    # 500 (its process is gone: README, "Losing a replica"): at most one per client thread.
    after = [s for t, s, _ in loop.records if t > killed_at and s != 200]
    assert set(after) <= {503}, f"requests sent after the replica loss failed: {after}"
    during = [s for t, s, _ in loop.records if killed_at - 10 < t <= killed_at and s != 200]
    assert set(during) <= {500, 503} and during.count(500) <= 4, during
    before = [s for t, s, _ in loop.records if t <= killed_at - 10 and s not in (200, 503)]
    assert not before, f"requests failed before the replica loss: {before}"
    late = [s for t, s, _ in loop.records if t > healthy_at and s != 200]
    assert not late, f"requests sent after the deployment recovered failed: {late}"
    began = time.monotonic()
    wait_for(lambda: len(replica_pids(APP)) == 1, 90, "the deployment did not scale back to 1")
    print(f"autoscaling: back to 1 replica {time.monotonic() - began:.1f} s after the load")
    health = requests.get(served.url + "v1/health", timeout=10)
    assert health.status_code == 200


def test_ctrl_c_stops_the_command_and_its_application(served: Served) -> None:
    served.process.send_signal(signal.SIGINT)
    assert served.process.wait(90) == 0, "".join(served.output)
    assert any("stopped" in line for line in served.output)
    wait_for(lambda: not replica_pids(APP), 30, "replicas left behind")
    with pytest.raises(requests.ConnectionError):
        requests.get(served.url + "v1/health", timeout=5)


def test_serve_deploy_of_the_config_file_and_a_model_change(served: Served, tmp_path: Path) -> None:
    """``serve deploy deploy/serve.yaml`` (the model pinned to version 1, one replica, a free
    port) through the dashboard with the token; then the same file naming version 2: the
    endpoint answers with version 2."""
    import yaml

    config = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["name"] = APP + "-deployed"
    app["args"]["autoscaling"].update(min_replicas=1, max_replicas=1)
    app["args"]["num_cpus"] = 0.5
    env = clean_env(served.platform.home, dict(served.platform.exports))
    url = f"http://127.0.0.1:{port}/"

    def deploy(version: str) -> None:
        app["args"]["model"] = f"models:/{MODEL}/{version}"
        path = tmp_path / f"serve-{version}.yaml"
        path.write_text(yaml.safe_dump(config))
        result = run_venv(
            ["serve", "deploy", str(path), "--address", env["RAY_ADDRESS"]], env=env, timeout=120
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def version_served() -> str | None:
        try:
            return requests.get(url + "v1/health", timeout=5).json()["model"]["version"]
        except (requests.RequestException, ValueError, KeyError):
            return None

    deploy("1")
    wait_for(lambda: version_served() == "1", 120, "serve deploy: version 1 not served")
    deploy("2")
    wait_for(lambda: version_served() == "2", 120, "serve deploy: version 2 not served")
    body = validation_png(served.data)
    response = requests.post(url + "v1/segment", data=body, headers={"Content-Type": "image/png"})
    assert response.status_code == 200 and response.headers["X-Model-Version"] == "2"
    result = run_venv(
        ["serve", "shutdown", "--yes", "--address", env["RAY_ADDRESS"]], env=env, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
