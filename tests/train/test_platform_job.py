"""Acceptance (issue 5): ``ray job submit`` of ``jobs/train_refinenet.py`` on the local platform.

What a user does, with nothing but the settings ``segplatform local up`` prints:

    segplatform local up --num-cpus 4          # Ray head (token auth), MLflow, S3 on 127.0.0.1
    segplatform data convert mni152-tissue s3://segplatform/datasets/mni152
    ray job submit --working-dir . -- python jobs/train_refinenet.py --tiny \\
        --data s3://segplatform/datasets/mni152 --storage s3://segplatform/runs --workers 2 \\
        --max-iters 2 --register-as refinenet-test
    segplatform local down

and what it must find: the job SUCCEEDED, its checkpoint on the platform's S3 server, the run
(FINISHED, with metrics) and a registered model version with alias ``champion`` on the platform's
MLflow server, a model package that ``load_package`` rebuilds from ``models:/NAME@champion``,
and a working-dir upload without the virtualenv or git history. ``--num-cpus 4`` gives two
0.5-CPU workers and Ray Data spare CPU on two cores.

The session's single-node platform serves the module (``single_node_platform``); this module's
data and runs live under ``s3://segplatform/platform-job/``. ``tests/platform/test_local.py``
checks that ``down`` leaves nothing.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.platform_support import (
    RunningPlatform,
    clean_env,
    job_runtime_env,
    run_venv,
    s3_client,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUN_NAME = "refinenet-platform"
MODEL_NAME = "refinenet-test"
MAX_ITERS = 2
PREFIX = "platform-job"  # this module's part of the platform's bucket


class Platform(RunningPlatform):
    """The platform ``segplatform local up`` started for this module."""

    def run(self, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
        """``args[0]`` from the venv in the repository root, with PATH (venv first), an empty
        HOME, locale and the printed settings; nothing else."""
        return run_venv(args, env=clean_env(self.home, self.exports), timeout=timeout, cwd=REPO)

    def s3_keys(self, prefix: str) -> list[str]:
        client = s3_client(self.exports)
        bucket = self.exports["SEGPLATFORM_S3_BUCKET"]
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.fixture(scope="module")
def platform(single_node_platform: RunningPlatform) -> Platform:
    return Platform(**vars(single_node_platform))


@pytest.fixture(scope="module")
def submitted(platform: Platform) -> dict[str, Any]:
    """The dataset converted to the platform's bucket and the training job submitted."""
    bucket = platform.exports["SEGPLATFORM_S3_BUCKET"]
    data = f"s3://{bucket}/{PREFIX}/datasets/mni152"
    convert = platform.run(["segplatform", "data", "convert", "mni152-tissue", data])
    assert convert.returncode == 0, convert.stdout + convert.stderr
    # The uploaded working dir has no .git: the README's way to tag the run with the commit.
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    runtime_env = job_runtime_env(SEGPLATFORM_GIT_COMMIT=commit)
    command = [
        "ray", "job", "submit", "--working-dir", ".", "--runtime-env-json", runtime_env, "--",
        "python", "jobs/train_refinenet.py", "--tiny", "--data", data,
        "--storage", f"s3://{bucket}/{PREFIX}/runs", "--workers", "2",
        "--max-iters", str(MAX_ITERS), "--register-as", MODEL_NAME, "--name", RUN_NAME,
    ]  # fmt: skip
    job = platform.run(command, timeout=600)
    output = job.stdout + job.stderr
    found = re.search(r"Job '(raysubmit_\w+)'", output)
    assert found, output[-3000:] + "\n" + platform.diagnostics()
    return {
        "data": data,
        "bucket": bucket,
        "job": job,
        "output": output,
        "id": found[1],
        "commit": commit,
    }


def test_job_succeeded(platform: Platform, submitted: dict[str, Any]) -> None:
    output = submitted["output"]
    assert submitted["job"].returncode == 0, output[-5000:] + "\n" + platform.diagnostics()
    assert f"Job '{submitted['id']}' succeeded" in output, output[-5000:]
    status = platform.run(["ray", "job", "status", submitted["id"]], timeout=60)
    assert f"Job '{submitted['id']}' succeeded" in status.stdout, status.stdout + status.stderr
    # The job's own summary (jobs/train_refinenet.py -> run_from_args).
    assert f"run {RUN_NAME}: {MAX_ITERS} iterations" in output
    assert f"registered as models:/{MODEL_NAME}@champion" in output


def test_working_dir_upload_leaves_out_venv_git_and_data(
    platform: Platform, submitted: dict[str, Any]
) -> None:
    """Ray packs the working dir minus .git, .venv and what .gitignore lists."""
    temp_dir = Path(platform.state["services"]["ray_head"]["temp_dir"])
    unpacked = [  # the repository's upload (other modules' jobs upload other folders)
        p
        for p in temp_dir.glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*")
        if (p / "pyproject.toml").is_file()
    ]
    assert len(unpacked) == 1, unpacked
    package = unpacked[0]
    names = {p.name for p in package.iterdir()}
    assert {"jobs", "segplatform", "architectures", "pyproject.toml"} <= names
    assert not names & {".venv", ".git", "mlruns", "data", ".segplatform", ".pytest_cache"}
    size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
    assert size < 20 << 20, f"working dir upload is {size / 2**20:.1f} MiB"


def test_checkpoint_is_on_the_platform_s3(platform: Platform, submitted: dict[str, Any]) -> None:
    keys = platform.s3_keys(f"{PREFIX}/runs/{RUN_NAME}/")
    final = [k for k in keys if f"/checkpoint_step{MAX_ITERS:08d}_" in k]
    files = {k.split("/", 4)[4] for k in final}  # path inside the checkpoint directory
    assert {"model/model.json", "model/model.safetensors", "train_state.pt"} <= files, keys


def test_mlflow_has_the_finished_run_and_champion_version(
    platform: Platform, submitted: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from segplatform.package import load_package

    uri = platform.exports["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("segplatform")
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`segplatform.run_key` = '{RUN_NAME}'"
    )
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") == []
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_miou")] == [2]
    assert 0.0 <= run.data.metrics["val_miou"] <= 1.0
    assert run.data.params["train.arch"] == "refinenet"
    assert run.data.params["plan.world_size"] == "2"

    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert version.run_id == run.info.run_id
    assert version.tags["dataset"] == submitted["data"]
    assert version.tags["manifest_version"] == "1"
    assert version.tags["ray_run_name"] == RUN_NAME
    assert version.tags["git_commit"] == submitted["commit"]
    assert version.tags["checkpoint"].startswith(f"{submitted['bucket']}/{PREFIX}/runs/{RUN_NAME}/")

    # As a user with the printed settings would (download_artifacts' own tracking_uri and
    # registry_uri arguments do not reach the models:/ alias lookup in MLflow 3.17).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    local = mlflow.artifacts.download_artifacts(
        f"models:/{MODEL_NAME}@champion", dst_path=str(tmp_path)
    )
    model, meta = load_package(local)
    assert meta.architecture == "refinenet"
    assert meta.classes == ("background", "grey matter", "white matter", "other brain")
    assert meta.extra["run_name"] == RUN_NAME and meta.extra["step"] == MAX_ITERS
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 48))["out"]
    assert out.shape == (1, 4, 64, 48)
