"""Acceptance (issue 15): sweeps submitted with ``ray job submit`` to ``segplatform local up``.

One platform with 2 logical CPUs serves the module (a trial's 2 workers take 0.5 CPU each, so
trials run one at a time and a CPU stays free for batch decoding), with the built-in real dataset
``mni152-tissue`` and every run on the platform's S3 server. In file order:

1. A request that can never fit the cluster is refused at once, before any trial starts.
2. A DeepLab v3 sweep of 4 trials (tiny, atrous rates x learning rate on a grid, ASHA) whose
   driver is SIGKILLed once a trial has ended and the next has written a checkpoint, then
   resubmitted with ``--resume``: 4 trials in all, the trials that had ended are not run again
   (their MLflow records and stored results are unchanged), the interrupted one continues from
   its checkpoint, ASHA stopped at least one early, the best is registered and aliased, and
   MLflow holds the parent with one child per trial, none RUNNING, the results table and figure
   on the parent.
3. A small PSPNet bins sweep: its results and figure are per value of ``bins``.
"""

from __future__ import annotations

import csv
import io
import json
import re
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.platform_support import (
    RunningPlatform,
    clean_env,
    platform_up,
    run_venv,
    s3_client,
    wait_for,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BUCKET = "segplatform"
EXPERIMENT = "sweeps"
TRIAL_PROCESSES = ("ray::ImplicitFunc", "ray::TrainController", "ray::RayTrainWorker")


@dataclass
class Platform(RunningPlatform):
    prefix: str  # s3://segplatform/<prefix>/... holds this module's data and runs

    @property
    def data(self) -> str:
        return f"s3://{BUCKET}/{self.prefix}/mni152"

    @property
    def storage(self) -> str:
        return f"s3://{BUCKET}/{self.prefix}/runs"

    def client_env(self) -> dict[str, str]:
        exports = {k: v for k, v in self.exports.items() if k != "SEGPLATFORM_HOME"}
        return clean_env(self.home, exports)

    def ray(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_venv(["ray", *args], env=self.client_env(), timeout=timeout, cwd=REPO)

    def submit(
        self, command: list[str], *, wait: bool = True, submission_id: str | None = None,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        args = ["job", "submit", "--working-dir", str(REPO)]
        if not wait:
            args.append("--no-wait")
        if submission_id:
            args += ["--submission-id", submission_id]
        return self.ray([*args, "--", *command], timeout=timeout)

    def job_status(self, job_id: str) -> str:
        token = Path(self.exports["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        request = urllib.request.Request(
            f"{self.exports['RAY_ADDRESS']}/api/jobs/{job_id}",
            headers={"Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            return str(json.load(reply)["status"])

    def mlflow(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.exports["MLFLOW_TRACKING_URI"])

    def s3_keys(self, prefix: str) -> dict[str, str]:
        pages = (
            s3_client(self.exports)
            .get_paginator("list_objects_v2")
            .paginate(Bucket=BUCKET, Prefix=prefix)
        )
        return {item["Key"]: item["ETag"] for page in pages for item in page.get("Contents", [])}

    def s3_text(self, key: str) -> str:
        return s3_client(self.exports).get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()

    def processes(self, *patterns: str) -> list[psutil.Process]:
        """The platform's processes (by its instance marker) whose command line holds one of
        ``patterns``."""
        marker = f"{self.state['instance_id']}/"
        found = []
        for process in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmdline = " ".join(process.info["cmdline"] or [])
                if not any(p in cmdline for p in patterns):
                    continue
                if process.environ().get("SEGPLATFORM_INSTANCE", "").startswith(marker):
                    found.append(process)
            except (psutil.Error, OSError):
                continue
        return found


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    from segplatform.data.sources import convert_builtin

    with platform_up(tmp_path_factory, "sweep-platform", ["--num-cpus", "2"]) as running:
        platform = Platform(**vars(running), prefix=f"sweep-{uuid.uuid4().hex[:8]}")
        exports = platform.exports
        options = {
            "endpoint_url": exports["AWS_ENDPOINT_URL"],
            "key": exports["AWS_ACCESS_KEY_ID"],
            "secret": exports["AWS_SECRET_ACCESS_KEY"],
            "region": exports["AWS_DEFAULT_REGION"],
        }
        # The built-in real dataset, every 8th slice: 30 train / 12 val rows.
        convert_builtin(
            "mni152-tissue", platform.data, storage_options=options, show_progress=False, stride=8
        )
        yield platform


def sweep_command(platform: Platform, job: str, name: str, space: Path, *extra: str) -> list[str]:
    """A grid sweep of tiny trials (batches decoded in the workers: fewer processes to start)."""
    return [
        "python", job, "--tiny", "--data", platform.data, "--storage", platform.storage,
        "--name", name, "--space", str(space), "--search", "grid", "--experiment", EXPERIMENT,
        "--set", "overlay_samples=0", "--set", "loader_tasks=0", *extra,
    ]  # fmt: skip


def children(platform: Platform, parent_id: str) -> list[Any]:
    client = platform.mlflow()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )


def parent_run(platform: Platform, name: str) -> Any:
    client = platform.mlflow()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`segplatform.sweep` = '{name}'"
    )
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def results_table(platform: Platform, run_id: str) -> list[dict[str, str]]:
    """The parent run's ``results.csv``."""
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(
        run_id=run_id,
        artifact_path="results.csv",
        tracking_uri=platform.exports["MLFLOW_TRACKING_URI"],
    )
    return list(csv.DictReader(io.StringIO(Path(local).read_text())))


def artifact_names(platform: Platform, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in platform.mlflow().list_artifacts(run_id, path)}


# ---- tests --------------------------------------------------------------------------------------


def test_request_that_can_never_fit_is_refused_at_once(platform: Platform, tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  atrous_rates: {choice: [[1, 2, 3], [2, 4, 6]]}\n")
    name = "nofit-" + uuid.uuid4().hex[:6]
    command = sweep_command(
        platform, "jobs/sweep_deeplab_v3.py", name, space, "--workers", "3",
        "--cpus-per-worker", "1", "--max-iters", "4", "--eval-every", "2",
    )  # fmt: skip
    started = time.monotonic()
    result = platform.submit(command, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    assert f"error: sweep {name} refused: cannot place 3 worker(s)" in output, output[-4000:]
    assert "holds at most 2 such worker(s)" in output
    assert not re.search(rf"{name}: trial \S+ started", output)
    assert platform.s3_keys(f"{platform.prefix}/runs/{name}/tune/") == {}
    assert time.monotonic() - started < 120


def test_deeplab_sweep_killed_and_resumed(platform: Platform, tmp_path: Path) -> None:
    name = "dlv3-" + uuid.uuid4().hex[:6]
    model = f"{name}-model"
    space = tmp_path / "space.yaml"
    # Atrous rates x a learning rate that learns and one that cannot: ASHA has something to stop.
    space.write_text(
        "params:\n"
        "  atrous_rates: {choice: [[1, 2, 3], [2, 4, 6]]}\n"
        "  lr: {choice: [0.003, 1.0e-7]}\n"
    )
    command = sweep_command(
        platform, "jobs/sweep_deeplab_v3.py", name, space, "--workers", "2", "--max-iters", "4",
        "--eval-every", "2", "--register-as", model,
    )  # fmt: skip
    job = f"{name}-first"
    submitted = platform.submit(command, wait=False, submission_id=job)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    trials_prefix = f"{platform.prefix}/runs/{name}/trials/"

    def parent_id() -> str | None:
        client = platform.mlflow()
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            return None
        runs = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`segplatform.sweep` = '{name}'"
        )
        return runs[0].info.run_id if runs else None

    def ready_to_kill() -> bool:
        """A trial has ended and a running one has a registered checkpoint."""
        assert platform.job_status(job) in ("PENDING", "RUNNING"), platform.ray(
            ["job", "logs", job]
        ).stdout[-5000:]
        parent = parent_id()
        if parent is None:
            return False
        runs = children(platform, parent)
        if not any(r.info.status in ("FINISHED", "KILLED") for r in runs):
            return False
        for run in runs:
            if run.info.status != "RUNNING":
                continue
            snapshot = f"{trials_prefix}{run.info.run_name}/checkpoint_manager_snapshot.json"
            try:
                if "checkpoint_step" in platform.s3_text(snapshot):
                    return True
            except Exception:
                continue
        return False

    wait_for(ready_to_kill, 600, "no trial ended while the next one checkpointed", 1.0)
    # The job's entrypoint runs under a shell; the driver is the Python process.
    drivers = [
        p
        for p in platform.processes("jobs/sweep_deeplab_v3.py")
        if name in " ".join(p.cmdline()) and p.name().startswith("python")
    ]
    assert len(drivers) == 1, drivers
    drivers[0].send_signal(signal.SIGKILL)  # the job's driver, not a clean stop
    wait_for(lambda: platform.job_status(job) == "FAILED", 120, "the killed job did not fail")
    # Trials die with their driver; wait until their processes are gone before resuming.
    wait_for(
        lambda: not platform.processes(*TRIAL_PROCESSES), 120, "the killed sweep's trials live on"
    )
    parent = parent_id()
    before = {r.info.run_name: r for r in children(platform, parent)}
    ended = {n: r for n, r in before.items() if r.info.status in ("FINISHED", "KILLED")}
    interrupted = {n for n, r in before.items() if r.info.status == "RUNNING"}
    assert ended and interrupted, {n: r.info.status for n, r in before.items()}
    client = platform.mlflow()
    histories = {
        n: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "val_miou")]
        for n, r in ended.items()
    }
    stored = {n: platform.s3_keys(f"{trials_prefix}{n}/") for n in ended}

    # ---- resume ----
    resumed = platform.submit([*command, "--resume"], timeout=900)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-6000:]
    assert "; resuming" in output, output[-6000:]
    for run_name in ended:  # no trial that had ended starts again
        trial_id = run_name[len(name) + 1 :]
        assert not re.search(rf"trial {trial_id} (started|resumed)", output), output[-6000:]
    # What it prints: one line per event, then the table best first and the registered model.
    assert re.search(rf"{name}: trial \S+ evaluated at step \d+/4: val mIoU", output)
    assert re.search(rf"{name}: trial \S+ finished at step 4/4: best val mIoU", output)
    table = output[output.index(f"sweep {name}: 4 trial(s), best validation mIoU first") :]
    assert re.search(r"#\s+trial\s+atrous_rates\s+lr\s+best mIoU", table)
    assert f"registered as models:/{model}@champion" in table

    # ---- records ----
    parent_record = parent_run(platform, name)
    assert parent_record.info.status == "FINISHED", output[-6000:]
    runs = {r.info.run_name: r for r in children(platform, parent_record.info.run_id)}
    assert len(runs) == 4, sorted(runs)  # one child per trial, the number asked for
    assert {r.info.status for r in runs.values()} <= {"FINISHED", "KILLED"}
    rows = results_table(platform, parent_record.info.run_id)
    assert len(rows) == 4 and {r["run_name"] for r in rows} == set(runs)
    assert [float(r["best_val_miou"]) for r in rows] == sorted(
        (float(r["best_val_miou"]) for r in rows), reverse=True
    )
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped, rows  # ASHA stopped at least one trial early
    for row in stopped:
        assert runs[row["run_name"]].info.status == "KILLED"
        assert int(row["step"]) < 4
    assert {"results.csv", "results.png", "space.json"} <= artifact_names(
        platform, parent_record.info.run_id
    )
    # The trials that had ended were not run again: same records, same stored results.
    for run_name, run in ended.items():
        now = client.get_run(run.info.run_id)
        assert now.info.end_time == run.info.end_time, run_name
        assert [
            (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_miou")
        ] == histories[run_name]
        assert "placement/attempt2.json" not in artifact_names(
            platform, run.info.run_id, "placement"
        )
        after = platform.s3_keys(f"{trials_prefix}{run_name}/")
        assert {k: v for k, v in after.items() if "/checkpoint_step" in k} == {
            k: v for k, v in stored[run_name].items() if "/checkpoint_step" in k
        }
    # The interrupted trial went on from its checkpoint (unless ASHA had just stopped it).
    for run_name in interrupted:
        run = runs[run_name]
        starts = {int(m.value) for m in client.get_metric_history(run.info.run_id, "start_step")}
        if run.info.status == "FINISHED":
            assert max(starts) >= 2, starts
    # The best trial's best checkpoint is the registered champion.
    best = rows[0]
    version = client.get_model_version_by_alias(model, "champion")
    assert version.tags["sweep"] == name
    assert version.tags["ray_run_name"] == best["run_name"]
    assert float(version.tags["val_miou"]) == pytest.approx(float(best["best_val_miou"]), abs=1e-4)
    assert version.tags["checkpoint"].startswith(f"{BUCKET}/{platform.prefix}/runs/{name}/")
    assert parent_record.data.tags["best_run"] == best["run_name"]
    assert parent_record.data.tags["registered_model"] == f"models:/{model}@champion"
    assert parent_record.data.metrics["best_val_miou"] == pytest.approx(
        float(best["best_val_miou"]), abs=1e-4
    )


def test_pspnet_bins_sweep(platform: Platform, tmp_path: Path) -> None:
    name = "psp-" + uuid.uuid4().hex[:6]
    space = tmp_path / "bins.yaml"
    space.write_text("params:\n  bins: {choice: [[1], [1, 2, 3, 6]]}\n")
    command = sweep_command(
        platform, "jobs/sweep_pspnet.py", name, space, "--workers", "1", "--max-iters", "2",
        "--eval-every", "2", "--scheduler", "none",
    )  # fmt: skip
    result = platform.submit(command, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    # One 0.5-CPU worker per trial: both trials fit beside a free CPU, and run at once.
    assert "2 trial(s) at once" in output, output[-6000:]
    parent = parent_run(platform, name)
    rows = results_table(platform, parent.info.run_id)
    assert sorted(r["bins"] for r in rows) == ["(1)", "(1, 2, 3, 6)"]
    assert {r["status"] for r in rows} == {"finished"}
    assert all(0.0 <= float(r["best_val_miou"]) <= 1.0 for r in rows)
    assert "results.png" in artifact_names(platform, parent.info.run_id)
    runs = children(platform, parent.info.run_id)
    assert sorted(r.data.params["model.bins"] for r in runs) == ["[1, 2, 3, 6]", "[1]"]
    assert {r.info.status for r in runs} == {"FINISHED"}
