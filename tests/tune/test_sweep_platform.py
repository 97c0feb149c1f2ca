"""Acceptance (issue 15): sweeps submitted with ``ray job submit`` to ``segplatform local up``.

The session's single-node platform (4 logical CPUs) serves the module, with the built-in real
dataset ``mni152-tissue`` and every run on the platform's S3 server under this module's prefix.
In file order:

1. A request that can never fit the cluster is refused at once, before any trial starts.
2. A DeepLab v3 sweep of 2 trials at once (tiny, atrous rates on a grid, ASHA with its rung at
   step 2, one worker each) whose driver is SIGKILLed while one trial has ended (and Tune's state
   in the storage says so) and the other, let through by ASHA, is held after its step-3
   checkpoint (the ``pause_at_step`` test knob: the trial signals that it is held; nothing here
   waits on time). Resubmitted with
   ``--resume``: the trial that had ended is not run again (its MLflow record and stored results
   are unchanged), the held one continues from step 3 and ends in the state of the same trial
   run without interruption (weights, optimizer, schedule, RNG states), the best is registered
   and aliased, and MLflow holds the parent with one child per trial, none RUNNING, the results
   table and figure on the parent.
``tests/tune/test_sweep_local.py`` runs a sweep job on the in-process cluster.
"""

from __future__ import annotations

import csv
import io
import json
import re
import signal
import subprocess
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from segplatform.train.loop import pause_marker, release_pause
from tests.platform_support import (
    RunningPlatform,
    clean_env,
    job_runtime_env,
    run_venv,
    s3_client,
    wait_for,
)
from tests.resume_support import assert_same_state, checkpoint_state, checkpoints

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

    def storage_options(self) -> dict[str, str]:
        exports = self.exports
        return {
            "endpoint_url": exports["AWS_ENDPOINT_URL"],
            "key": exports["AWS_ACCESS_KEY_ID"],
            "secret": exports["AWS_SECRET_ACCESS_KEY"],
            "region": exports["AWS_DEFAULT_REGION"],
        }

    def client_env(self) -> dict[str, str]:
        exports = {k: v for k, v in self.exports.items() if k != "SEGPLATFORM_HOME"}
        return clean_env(self.home, exports)

    def ray(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_venv(["ray", *args], env=self.client_env(), timeout=timeout, cwd=REPO)

    def submit(
        self, command: list[str], *, wait: bool = True, submission_id: str | None = None,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        args = [
            "job",
            "submit",
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            job_runtime_env(),
        ]
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
def platform(single_node_platform: RunningPlatform) -> Platform:
    from segplatform.data.sources import convert_builtin

    platform = Platform(**vars(single_node_platform), prefix=f"sweep-{uuid.uuid4().hex[:8]}")
    # The built-in real dataset, every 8th slice: 30 train / 12 val rows.
    convert_builtin(
        "mni152-tissue",
        platform.data,
        storage_options=platform.storage_options(),
        show_progress=False,
        stride=8,
    )
    return platform


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
        platform, "jobs/sweep_deeplab_v3.py", name, space, "--workers", "5",
        "--cpus-per-worker", "1", "--max-iters", "4", "--eval-every", "2",
    )  # fmt: skip
    result = platform.submit(command, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    assert f"error: sweep {name} refused: cannot place 5 worker(s)" in output, output[-4000:]
    assert "holds at most 4 such worker(s)" in output
    assert not re.search(rf"{name}: trial \S+ started", output)
    assert platform.s3_keys(f"{platform.prefix}/runs/{name}/tune/") == {}


HOLD = 3  # trials are held after this step (past ASHA's rung at step 2) until released


def test_deeplab_sweep_killed_and_resumed(platform: Platform, tmp_path: Path) -> None:
    name = "dlv3-" + uuid.uuid4().hex[:6]
    model = f"{name}-model"
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  atrous_rates: {choice: [[1, 2, 3], [2, 4, 6]]}\n")
    command = sweep_command(
        platform, "jobs/sweep_deeplab_v3.py", name, space, "--workers", "1",
        "--max-concurrent", "2", "--max-iters", "4", "--eval-every", "2",
        "--register-as", model, "--set", "checkpoint_every=1", "--set", f"pause_at_step={HOLD}",
    )  # fmt: skip
    job = f"{name}-first"
    submitted = platform.submit(command, wait=False, submission_id=job)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    trials_prefix = f"{platform.prefix}/runs/{name}/trials/"
    trials_uri = f"s3://{BUCKET}/{trials_prefix}"
    options = platform.storage_options()

    def trial_runs() -> dict[str, Any]:
        """Run name -> MLflow run of every trial that started."""
        client = platform.mlflow()
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            return {}
        parents = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`segplatform.sweep` = '{name}'"
        )
        if not parents:
            return {}
        return {r.info.run_name: r for r in children(platform, parents[0].info.run_id)}

    released: set[str] = set()
    state_prefix = f"{platform.prefix}/runs/{name}/tune/"

    def stored_statuses() -> dict[str, str]:
        """Run name -> status of each trial in the newest experiment state Tune uploaded to the
        storage (what a resume reads)."""
        states = sorted(k for k in platform.s3_keys(state_prefix) if "experiment_state-" in k)
        if not states:
            return {}
        trials = [json.loads(t) for t, _ in json.loads(platform.s3_text(states[-1]))["trial_data"]]
        return {f"{name}-{t['trial_id']}": str(t["status"]) for t in trials}

    def held_with_one_ended() -> tuple[str, dict[str, Any]] | None:
        """Once one trial has ended and the other is held: (its run name, its hold marker).
        While both are held and none has ended, one of them is released to end."""
        assert platform.job_status(job) in ("PENDING", "RUNNING"), platform.ray(
            ["job", "logs", job]
        ).stdout[-5000:]
        runs = trial_runs()
        ended = [n for n, r in runs.items() if r.info.status in ("FINISHED", "KILLED")]
        held = {
            n: marker
            for n, r in sorted(runs.items())
            if r.info.status == "RUNNING"
            and n not in released
            and (marker := pause_marker(trials_uri + n, HOLD, options))
        }
        if ended and held:
            stored = stored_statuses()
            if all(stored.get(n) == "TERMINATED" for n in ended):
                return next(iter(held.items()))
        if len(runs) == 2 and not ended and len(held) == 2:
            first = next(iter(held))
            release_pause(trials_uri + first, HOLD, options)
            released.add(first)
        return None

    interrupted, marker = wait_for(
        held_with_one_ended, 600, "no trial was held past ASHA's rung after another ended", 1.0
    )
    assert marker["step"] == HOLD
    # The job's entrypoint runs under a shell; the driver is the Python process.
    drivers = [
        p
        for p in platform.processes("jobs/sweep_deeplab_v3.py")
        if name in " ".join(p.cmdline()) and p.name().startswith("python")
    ]
    assert len(drivers) == 1, drivers
    drivers[0].send_signal(signal.SIGKILL)  # the job's driver, not a clean stop
    wait_for(lambda: platform.job_status(job) == "FAILED", 120, "the killed job did not fail")
    # Trials die with their driver; resume once their processes are gone.
    wait_for(
        lambda: not platform.processes(*TRIAL_PROCESSES), 120, "the killed sweep's trials live on"
    )
    before = trial_runs()
    ended = {n: r for n, r in before.items() if r.info.status in ("FINISHED", "KILLED")}
    assert set(before) == {*ended, interrupted}, {n: r.info.status for n, r in before.items()}
    assert before[interrupted].info.status == "RUNNING"
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
    # No trial that had ended trains again (the kill came after the stored state said so).
    for run_name in ended:
        trial_id = run_name[len(name) + 1 :]
        assert not re.search(rf"trial {trial_id} started", output), output[-6000:]
        assert not re.search(rf"{run_name} attempt 2:", output), output[-6000:]
    # What it prints: one line per event, then the table best first and the registered model.
    assert re.search(rf"{name}: trial \S+ finished at step 4/4: best val mIoU", output)
    table = output[output.index(f"sweep {name}: 2 trial(s), best validation mIoU first") :]
    assert re.search(r"#\s+trial\s+atrous_rates\s+best mIoU", table)
    assert f"registered as models:/{model}@champion" in table

    # ---- the held trial went on from its step-3 checkpoint, as if never interrupted ----
    after = client.get_run(before[interrupted].info.run_id)
    assert after.info.status == "FINISHED"
    starts = [int(m.value) for m in client.get_metric_history(after.info.run_id, "start_step")]
    assert max(starts) == HOLD, starts  # the resumed attempt started at the held checkpoint
    resumed_final = checkpoints(trials_uri + interrupted, options)[4]
    reference = uninterrupted_run(platform, trials_uri + interrupted, tmp_path)
    assert_same_state(
        checkpoint_state(resumed_final[-1], options), checkpoint_state(reference, options)
    )

    # ---- records ----
    parent_record = parent_run(platform, name)
    assert parent_record.info.status == "FINISHED", output[-6000:]
    runs = {r.info.run_name: r for r in children(platform, parent_record.info.run_id)}
    assert set(runs) == set(before)  # one child per trial, the number asked for
    assert {r.info.status for r in runs.values()} <= {"FINISHED", "KILLED"}
    rows = results_table(platform, parent_record.info.run_id)
    assert len(rows) == 2 and {r["run_name"] for r in rows} == set(runs)
    assert [float(r["best_val_miou"]) for r in rows] == sorted(
        (float(r["best_val_miou"]) for r in rows), reverse=True
    )
    for row in rows:  # a trial ASHA stopped early stopped at its rung
        if row["status"] == "stopped early":
            assert runs[row["run_name"]].info.status == "KILLED"
            assert int(row["step"]) < 4
    assert {"results.csv", "results.png", "space.json"} <= artifact_names(
        platform, parent_record.info.run_id
    )
    # The trial that had ended was not run again: same records, same stored results.
    for run_name, run in ended.items():
        now = client.get_run(run.info.run_id)
        assert now.info.end_time == run.info.end_time, run_name
        assert [
            (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_miou")
        ] == histories[run_name]
        assert "placement/attempt2.json" not in artifact_names(
            platform, run.info.run_id, "placement"
        )
        now_stored = platform.s3_keys(f"{trials_prefix}{run_name}/")
        assert {k: v for k, v in now_stored.items() if "/checkpoint_step" in k} == {
            k: v for k, v in stored[run_name].items() if "/checkpoint_step" in k
        }
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


def uninterrupted_run(platform: Platform, trial_uri: str, tmp_path: Path) -> str:
    """The trial's run (its ``config.json``) trained again without interruption on the platform,
    with ``segplatform train --config``; the URI of its final checkpoint."""
    from segplatform.data import io as dio

    fs, path = dio.resolve(f"{trial_uri}/config.json", platform.storage_options())
    with fs.open_input_stream(path) as stream:
        config = json.loads(stream.read().decode())
    name = f"{config['name']}-reference"
    storage = f"{platform.storage}/references"
    config.update(
        name=name,
        storage_path=storage,
        pause_at_step=None,
        mlflow_parent_run=None,
        experiment="sweep-references",
        ray_address=platform.state["services"]["ray_head"]["gcs_address"],
    )
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(config))
    result = run_venv(
        ["segplatform", "train", "--config", str(path)],
        env=platform.client_env(),
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    final = checkpoints(f"{storage}/{name}", platform.storage_options())
    return final[config["max_iters"]][-1]
