"""Integration tests of ``segplatform local up|status|down`` with real servers on 127.0.0.1.

The tests run in file order on the session's single-node platform (``single_node_platform``,
``segplatform local up --num-cpus 4``), after every other module that uses it (``ends_platform``):
``test_status_names_the_ray_process_that_died`` takes its head down and
``test_down_leaves_nothing`` stops it.
"""

from __future__ import annotations

import json
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.platform_support import (
    RunningPlatform,
    clean_env,
    leftover_processes,
    open_ports,
    run_cli,
    run_venv,
    s3_client,
    service_ports,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.ends_platform]

CLIENT_KEYS = (
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN_PATH",
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "SEGPLATFORM_S3_BUCKET",
)
JOB_SCRIPT = """\
import os
import ray

ray.init()
print("JOB-MARKER", int(ray.cluster_resources()["CPU"]), os.environ["MLFLOW_TRACKING_URI"])
"""


def submit_job(
    working_dir: Path, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    command = ["job", "submit", "--working-dir", str(working_dir), "--", "python", "job.py"]
    return run_venv(["ray", *command], env=env, timeout=timeout)


@pytest.fixture(scope="module")
def local_platform(single_node_platform: RunningPlatform) -> RunningPlatform:
    return single_node_platform


def leftovers(state_dir: Path, extra_paths: tuple[str, ...], ports: set[int]) -> list[str]:
    """Processes whose command line or environment mention the platform (or its ports)."""
    token_path = str(state_dir / "ray" / "auth_token")
    return leftover_processes(paths=(state_dir, *extra_paths), ports=ports, token_path=token_path)


def test_up_prints_addresses_and_exports(local_platform: RunningPlatform) -> None:
    exports = local_platform.exports
    assert set(CLIENT_KEYS) <= set(exports)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", exports["RAY_ADDRESS"])
    assert exports["RAY_AUTH_MODE"] == "token"
    token_path = Path(exports["RAY_AUTH_TOKEN_PATH"])
    assert token_path.is_relative_to(local_platform.state_dir)
    assert re.fullmatch(r"[0-9a-f]{64}", token_path.read_text().strip())
    assert exports["SEGPLATFORM_S3_BUCKET"] == "segplatform"
    for secret_file in (
        token_path,
        local_platform.state_dir / "env.sh",
        local_platform.state_dir / "s3" / "credentials.json",
    ):
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600, secret_file
    gcs_port = local_platform.state["services"]["ray_head"]["ports"]["gcs"]
    assert not 10002 <= gcs_port <= 19999
    assert "MLflow" in local_platform.up_output.stdout


def test_status_reports_every_service_healthy(local_platform: RunningPlatform) -> None:
    result = run_cli(["local", "status", "--state-dir", str(local_platform.state_dir), "--json"])
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["healthy"] is True
    assert {service["name"] for service in report["services"]} == {"s3", "mlflow", "ray_head"}


def test_up_again_says_already_up(local_platform: RunningPlatform) -> None:
    result = run_cli(["local", "up", "--state-dir", str(local_platform.state_dir)])
    assert result.returncode == 0, result.stderr
    assert "already up" in result.stdout
    assert json.loads((local_platform.state_dir / "state.json").read_text()) == local_platform.state


def test_job_submit_with_printed_settings_only(
    local_platform: RunningPlatform, tmp_path: Path
) -> None:
    (tmp_path / "job.py").write_text(JOB_SCRIPT)
    env = clean_env(local_platform.home, {k: local_platform.exports[k] for k in CLIENT_KEYS})
    result = submit_job(tmp_path, env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "succeeded" in output, output
    # The job reached the cluster and inherited the platform's MLflow address.
    assert f"JOB-MARKER 4 {local_platform.exports['MLFLOW_TRACKING_URI']}" in output, output


def test_job_submit_without_or_with_a_wrong_token_is_refused(
    local_platform: RunningPlatform, tmp_path: Path
) -> None:
    (tmp_path / "job.py").write_text(JOB_SCRIPT)
    address = {"RAY_ADDRESS": local_platform.exports["RAY_ADDRESS"]}
    wrong_token = tmp_path / "wrong_token"
    wrong_token.write_text("0" * 64)
    for extra in (
        address,
        {**address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(wrong_token)},
    ):
        result = submit_job(tmp_path, clean_env(local_platform.home, extra), timeout=60)
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        assert "JOB-MARKER" not in output
        assert re.search(r"Unauthorized|AuthenticationError|Unauthenticated", output), output


def test_mlflow_logs_a_run_with_artifacts_on_s3(
    local_platform: RunningPlatform, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=local_platform.exports["MLFLOW_TRACKING_URI"])
    experiment_id = client.create_experiment("local-platform-test")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "val_miou", 0.5)
    report = tmp_path / "report.txt"
    report.write_text("per-class IoU")
    client.log_artifact(run.info.run_id, str(report), "eval")
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).data.metrics["val_miou"] == 0.5
    # The artifact went through the tracking server into the platform's bucket.
    listing = s3_client(local_platform.exports, max_attempts=1).list_objects_v2(
        Bucket="segplatform", Prefix="mlflow-artifacts/"
    )
    keys = [item["Key"] for item in listing.get("Contents", [])]
    assert any(key.endswith(f"{run.info.run_id}/artifacts/eval/report.txt") for key in keys), keys


def test_s3_enforces_credentials(local_platform: RunningPlatform) -> None:
    from botocore.exceptions import ClientError

    good = s3_client(local_platform.exports, max_attempts=1)
    good.put_object(Bucket="segplatform", Key="probe.txt", Body=b"ok")
    assert good.get_object(Bucket="segplatform", Key="probe.txt")["Body"].read() == b"ok"
    with pytest.raises(ClientError) as refused:
        s3_client(local_platform.exports, secret="not-the-secret", max_attempts=1).get_object(
            Bucket="segplatform", Key="probe.txt"
        )
    assert refused.value.response["Error"]["Code"] in {
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "AccessDenied",
    }


def test_status_names_the_ray_process_that_died(local_platform: RunningPlatform) -> None:
    """``ray start --block`` stops the whole head when one of its processes dies; ``status``
    says which one instead of a bare "not ready"."""
    import psutil

    temp_dir = local_platform.state["services"]["ray_head"]["temp_dir"]
    dashboards = [
        process
        for process in psutil.process_iter(["cmdline"])
        if any("dashboard/dashboard.py" in part for part in process.info["cmdline"] or [])
        and temp_dir in " ".join(process.info["cmdline"])
    ]
    assert len(dashboards) == 1, dashboards
    dashboards[0].kill()

    def head_report() -> dict[str, Any] | None:
        report = local_platform.status_report()
        head = next(s for s in report["services"] if s["name"] == "ray_head")
        return None if head["alive"] else {"report": report, "head": head}

    found = wait_for(head_report, 60, "the head outlived its dashboard")
    assert found["report"]["healthy"] is False
    assert found["head"]["detail"].startswith("exited: dashboard"), found["head"]
    mlflow = next(s for s in found["report"]["services"] if s["name"] == "mlflow")
    assert mlflow["healthy"], mlflow


def test_down_leaves_nothing(local_platform: RunningPlatform) -> None:
    state = local_platform.state
    temp_dir = state["services"]["ray_head"]["temp_dir"]
    ports = service_ports(state)
    assert leftovers(local_platform.state_dir, (temp_dir,), ports), "the platform is not running"
    result = run_cli(["local", "down", "--state-dir", str(local_platform.state_dir)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert leftovers(local_platform.state_dir, (temp_dir,), ports) == []
    assert open_ports(ports) == []
    assert not (local_platform.state_dir / "state.json").exists()
    status = run_cli(["local", "status", "--state-dir", str(local_platform.state_dir)])
    assert status.returncode == 3 and "not up" in status.stdout
    # Data survives: the MLflow database and the S3 data stay in the state dir.
    assert (local_platform.state_dir / "mlflow" / "mlflow.db").stat().st_size > 0


def test_failed_start_stops_what_was_started(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    (state_dir / "mlflow").mkdir(parents=True)
    (state_dir / "mlflow" / "mlflow.db").write_text("this is not an SQLite database\n")
    result = run_cli(["local", "up", "--state-dir", str(state_dir)])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "mlflow server exited during start-up" in result.stderr
    assert "S3 (SeaweedFS)" in result.stderr  # S3 was up before MLflow failed
    assert not (state_dir / "state.json").exists()
    assert leftovers(state_dir, (), set()) == []
