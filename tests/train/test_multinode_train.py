"""Acceptance: training across a two-node Ray cluster on 127.0.0.1 (token auth on), with data,
checkpoints and MLflow artifacts on the platform's S3 server, jobs sent with ``ray job submit``.

The session's two-node platform (``two_node_platform``: ``segplatform local up --nodes 2
--num-cpus 1``) serves the module; the tests run in file order: a spread run, the fail-fast
refusals, and the node-loss run. The node-loss run is the spread run's settings held after its
step-2 checkpoint (``pause_at_step``: the run signals it, the test waits for that) while node-1
is killed and replaced; it resumes from that checkpoint on the head and the new node and ends in
the spread run's final state (weights, optimizer, schedule, RNG states). ``local down`` is
checked by ``tests/platform/test_multinode.py``.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from segplatform.train.loop import pause_marker
from tests.platform_support import (
    HEAD_OBJECT_STORE_MB,
    RunningPlatform,
    alive_nodes,
    clean_env,
    job_runtime_env,
    run_cli,
    run_venv,
    s3_client,
    wait_for,
)
from tests.resume_support import assert_same_state, checkpoint_state, checkpoints

REPO = Path(__file__).resolve().parents[2]
BUCKET = "segplatform"
SPREAD_RUN = "spread-" + uuid.uuid4().hex[:6]

pytestmark = pytest.mark.slow


# ---- helpers ------------------------------------------------------------------------------------


@dataclass
class Platform(RunningPlatform):
    """The two-node platform of this module."""

    prefix: str  # s3://segplatform/<prefix>/... holds this module's data and runs

    def client_env(self) -> dict[str, str]:
        """Only what ``segplatform local up`` printed (plus PATH, HOME, locale)."""
        exports = self.exports
        return clean_env(self.home, {k: v for k, v in exports.items() if k != "SEGPLATFORM_HOME"})

    def storage_options(self) -> dict[str, str]:
        exports = self.exports
        return {
            "endpoint_url": exports["AWS_ENDPOINT_URL"],
            "key": exports["AWS_ACCESS_KEY_ID"],
            "secret": exports["AWS_SECRET_ACCESS_KEY"],
            "region": exports["AWS_DEFAULT_REGION"],
        }

    def s3(self) -> Any:
        return s3_client(self.exports)

    def objects(self, key_prefix: str) -> dict[str, str]:
        """Key -> ETag of every object under ``key_prefix``."""
        pages = (
            self.s3().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=key_prefix)
        )
        return {item["Key"]: item["ETag"] for page in pages for item in page.get("Contents", [])}

    def mlflow(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.exports["MLFLOW_TRACKING_URI"])

    def alive_node_ids(self) -> dict[str, str]:
        """Node name -> node id of the nodes the cluster counts ALIVE."""
        return {name: node["node_id"] for name, node in alive_nodes(self.status_report()).items()}

    def ray(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_venv(["ray", *args], env=self.client_env(), timeout=timeout, cwd=REPO)


def write_dataset(
    uri: str, storage_options: dict[str, str], *, train: int = 8, val: int = 2, side: int = 48
) -> int:
    """``train`` and ``val`` images (side × side RGB noise, 3 classes) with blocky masks; the
    bytes of the images."""
    from PIL import Image

    from segplatform.data.format import DatasetInfo, DatasetWriter, Sample, default_palette

    info = DatasetInfo("tiny-multinode", ("a", "b", "c"), default_palette(3))
    written = 0
    with DatasetWriter(uri, info, storage_options=storage_options) as writer:
        for index in range(train + val):
            rng = np.random.default_rng(index)
            buffer = io.BytesIO()
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(buffer, "PNG", compress_level=0)
            blocks = rng.integers(0, 3, (6, 6))
            mask = np.kron(blocks, np.ones((side // 6, side // 6), dtype=np.int64))
            split = "train" if index < train else "val"
            image = buffer.getvalue()
            writer.add(split, Sample(f"s{index}", image, mask.astype(np.uint8), source=f"#{index}"))
            written += len(image)
    return written


def train_command(platform: Platform, name: str, *extra: str) -> list[str]:
    return [
        "python",
        "jobs/train_unet.py",
        "--tiny",
        "--data",
        f"s3://{BUCKET}/{platform.prefix}/data",
        "--storage",
        f"s3://{BUCKET}/{platform.prefix}/runs",
        "--name",
        name,
        "--experiment",
        "multinode",
        "--workers",
        "2",
        "--placement",
        "STRICT_SPREAD",
        *extra,
    ]


def submit(
    platform: Platform,
    command: list[str],
    *,
    wait: bool = True,
    timeout: float = 420,
    submission_id: str | None = None,
) -> subprocess.CompletedProcess[str]:
    args = ["job", "submit", "--working-dir", str(REPO), "--runtime-env-json", job_runtime_env()]
    if not wait:
        args.append("--no-wait")
    if submission_id:
        args += ["--submission-id", submission_id]
    return platform.ray([*args, "--", *command], timeout=timeout)


def job_status(platform: Platform, job_id: str) -> str:
    """The job's status from the job server's REST API (with the platform's token)."""
    exports = platform.exports
    token = Path(exports["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(
        f"{exports['RAY_ADDRESS']}/api/jobs/{job_id}",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        return str(json.load(reply)["status"])


def mlflow_run(platform: Platform, name: str) -> Any:
    client = platform.mlflow()
    experiment = client.get_experiment_by_name("multinode")
    assert experiment is not None, "the experiment 'multinode' was not created"
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'"
    )
    assert len(runs) == 1, [run.info.run_name for run in runs]
    return runs[0]


def placement_tables(platform: Platform, run_id: str) -> dict[int, dict[str, tuple]]:
    """attempt -> the placement table (column -> values) rank 0 logged for that attempt."""
    import mlflow.artifacts

    tables = {}
    for item in platform.mlflow().list_artifacts(run_id, "placement"):
        attempt = int(re.search(r"attempt(\d+)\.json$", item.path).group(1))
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=item.path,
            tracking_uri=platform.exports["MLFLOW_TRACKING_URI"],
        )
        data = json.loads(Path(local).read_text())
        tables[attempt] = dict(zip(data["columns"], zip(*data["data"])))
    return tables


@pytest.fixture(scope="module")
def platform(two_node_platform: RunningPlatform) -> Platform:
    platform = Platform(**vars(two_node_platform), prefix=f"multinode-{uuid.uuid4().hex[:8]}")
    write_dataset(f"s3://{BUCKET}/{platform.prefix}/data", platform.storage_options())
    return platform


# The settings of the spread run and of the node-loss run (the same run but for the loss).
RUN_SETTINGS = (
    "--max-iters", "6", "--eval-every", "2", "--checkpoint-every", "2", "--keep-checkpoints", "20",
    "--max-failures", "3",
)  # fmt: skip
HOLD = 2  # the node-loss run is held after this step's checkpoint


# ---- tests -------------------------------------------------------------------------------------


def test_spread_run_uses_both_nodes_and_ends_with_identical_parameters(
    platform: Platform,
) -> None:
    name = SPREAD_RUN
    result = submit(platform, train_command(platform, name, *RUN_SETTINGS))
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in output, output[-4000:]
    nodes = platform.alive_node_ids()
    assert set(nodes) == {"head", "node-1"}
    run = mlflow_run(platform, name)
    # Rank 0 logged where every worker ran: two distinct nodes, the cluster's two.
    tables = placement_tables(platform, run.info.run_id)
    assert set(tables) == {1}
    assert tables[1]["rank"] == (0, 1)
    # Ray Train numbers local ranks per node IP, and both raylets here share one IP.
    assert sorted(tables[1]["local_rank"]) == [0, 1]
    assert set(tables[1]["node_id"]) == set(nodes.values())
    assert run.data.tags["placement_strategy"] == "STRICT_SPREAD"
    assert run.data.tags["placement"].startswith("2 workers on 2 nodes: rank 0 -> ")
    assert run.data.metrics["num_nodes"] == 2
    # Each rank's parameter checksum after the last step: the replicas agree.
    checksums = [run.data.metrics[f"param_checksum_rank{rank}"] for rank in (0, 1)]
    assert checksums[0] == checksums[1] != 0.0
    assert run.data.metrics["step"] == 6
    # The rows were read from S3 where they were decoded, on both nodes: the driver (the job's
    # entrypoint on the head) read only footers, and node-1's decoding read its own share.
    reads = json.loads(run.data.tags["data_reads"])
    assert set(reads) <= set(nodes.values())
    assert reads[nodes["node-1"]][0] >= 1 and reads[nodes["node-1"]][1] > 0, reads
    assert f"data: training rows read from s3://{BUCKET}/" in output


def test_spread_larger_than_the_cluster_fails_fast(platform: Platform) -> None:
    name = "toobig-" + uuid.uuid4().hex[:6]
    # Ray alone would wait for ever for a third node: the job must end (the submit's timeout
    # raises otherwise) and say why.
    result = submit(platform, [*train_command(platform, name), "--workers", "3"], timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "FAILED" in output.upper(), output[-4000:]
    assert "STRICT_SPREAD puts every worker on its own node" in output, output[-4000:]
    assert "only 2 of the 2 alive node(s)" in output
    assert platform.objects(f"{platform.prefix}/runs/{name}") == {}  # nothing started


def test_a_dataset_larger_than_the_heads_object_store_trains_without_spilling(
    platform: Platform,
) -> None:
    """The head's object store holds HEAD_OBJECT_STORE_MB; the dataset is larger. The driver
    reads footers, the workers' decoding reads row groups from S3 on both nodes, and nothing
    spills on the head."""
    (head,) = [n for n in platform.status_report()["nodes"] if n["name"] == "head"]
    assert round(head["object_store_mb"]) == HEAD_OBJECT_STORE_MB  # the cap holds
    data = f"s3://{BUCKET}/{platform.prefix}/big"
    written = write_dataset(data, platform.storage_options(), train=112, val=2, side=576)
    assert written > 1.2 * HEAD_OBJECT_STORE_MB * 2**20, written
    name = "big-" + uuid.uuid4().hex[:6]
    command = train_command(platform, name, "--max-iters", "3", "--crop-size", "48")
    command[command.index("--data") + 1] = data
    result = submit(platform, command)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in output, output[-4000:]
    nodes = platform.alive_node_ids()
    reads = json.loads(mlflow_run(platform, name).data.tags["data_reads"])
    assert {node for node, (groups, _) in reads.items() if groups} == set(nodes.values()), reads
    # Ray's own object store statistics over the cluster: nothing spilled to disk, nothing
    # allocated outside the store (``ray memory`` prints those lines only when they happened).
    gcs = platform.read_state()["services"]["ray_head"]["gcs_address"]
    result = platform.ray(["memory", "--stats-only", "--address", gcs])
    memory = result.stdout + result.stderr
    assert "Aggregate object store stats" in memory, memory
    assert "Spilled" not in memory and "Plasma filesystem mmap usage" not in memory, memory


def test_local_storage_on_a_multi_node_cluster_fails_fast(
    platform: Platform, tmp_path: Path
) -> None:
    name = "local-" + uuid.uuid4().hex[:6]
    command = train_command(platform, name)
    command[command.index("--storage") + 1] = str(tmp_path / "runs")
    result = submit(platform, command, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    assert "TrainConfig.storage_path: the cluster has 2 nodes" in output, output[-4000:]
    assert "shared storage such as s3://" in output
    assert not (tmp_path / "runs").exists()


def test_node_loss_resumes_from_the_last_checkpoint_on_s3(platform: Platform) -> None:
    name = "nodeloss-" + uuid.uuid4().hex[:6]
    run_prefix = f"{platform.prefix}/runs/{name}/"
    run_uri = f"s3://{BUCKET}/{run_prefix}"
    lost_node = platform.alive_node_ids()["node-1"]
    command = train_command(platform, name, *RUN_SETTINGS, "--set", f"pause_at_step={HOLD}")
    job_id = f"{name}-job"
    submitted = submit(platform, command, wait=False, submission_id=job_id)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr

    def held() -> dict[str, Any] | None:
        assert job_status(platform, job_id) in ("PENDING", "RUNNING"), platform.ray(
            ["job", "logs", job_id]
        ).stdout[-5000:]
        return pause_marker(run_uri, HOLD, platform.storage_options())

    marker = wait_for(held, 300, f"{name} was not held after step {HOLD}", 1.0)
    assert marker["attempt"] == 1
    assert {worker["node_id"] for worker in marker["workers"]} == set(
        platform.alive_node_ids().values()
    )
    before = platform.objects(run_prefix)
    checkpoints_before = {k for k in before if k.endswith("/train_state.pt")}
    run_id = mlflow_run(platform, name).info.run_id
    # "Written" = delivered: rank 0 sends MLflow records from a background thread.
    wait_for(
        lambda: {m.step for m in platform.mlflow().get_metric_history(run_id, "loss")} >= {1, 2},
        60,
        "the metrics of steps 1 and 2 did not reach MLflow",
        1.0,
    )
    history_before = {
        (m.step, m.value) for m in platform.mlflow().get_metric_history(run_id, "loss")
    }
    # The second node dies (all its processes killed at once), then a new node joins.
    killed = run_cli(
        ["local", "node", "remove", "node-1", "--force", "--state-dir", str(platform.state_dir)]
    )
    assert killed.returncode == 0, killed.stdout + killed.stderr
    added = run_cli(
        ["local", "node", "add", "--state-dir", str(platform.state_dir), "--timeout", "300"],
        timeout=320,
    )
    assert added.returncode == 0, added.stdout + added.stderr
    new_node = added.stdout.split()[1]

    final = wait_for(
        lambda: (lambda status: status if status in ("SUCCEEDED", "FAILED", "STOPPED") else None)(
            job_status(platform, job_id)
        ),
        600,
        f"{name} did not end",
        1.0,
    )
    logs = platform.ray(["job", "logs", job_id]).stdout
    assert final == "SUCCEEDED", logs[-6000:]

    run = mlflow_run(platform, name)
    client = platform.mlflow()
    # The run went on from the checkpoint it was held at: a second attempt starting at step 2.
    attempts = {int(m.value) for m in client.get_metric_history(run.info.run_id, "attempt")}
    assert attempts == {1, 2}, attempts
    start_steps = {int(m.value) for m in client.get_metric_history(run.info.run_id, "start_step")}
    assert start_steps == {0, HOLD}, start_steps
    assert run.data.metrics["step"] == 6
    # The new attempt ran on the head and the new node, not on the lost one.
    tables = placement_tables(platform, run.info.run_id)
    assert set(tables) == {1, 2}
    assert set(tables[2]["node_id"]) == {platform.alive_node_ids()["head"], new_node}
    assert lost_node in tables[1]["node_id"]
    checksums = [run.data.metrics[f"param_checksum_rank{rank}"] for rank in (0, 1)]
    assert checksums[0] == checksums[1]
    # It ended in the state of the same run without the loss (the spread run).
    options = platform.storage_options()
    resumed = checkpoints(run_uri, options)[6][-1]
    spread = checkpoints(f"s3://{BUCKET}/{platform.prefix}/runs/{SPREAD_RUN}", options)[6][-1]
    assert_same_state(checkpoint_state(resumed, options), checkpoint_state(spread, options))
    # Nothing written before the loss is lost: checkpoints on S3 and the MLflow history.
    after = platform.objects(run_prefix)
    assert {k: after.get(k) for k in before if "/checkpoint_step" in k} == {
        k: v for k, v in before.items() if "/checkpoint_step" in k
    }
    assert checkpoints_before
    history_after = {(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history_before <= history_after
    assert {step for step, _ in history_after} == set(range(1, 7))
