"""RunTracker: non-blocking MLflow logging that survives an unreachable tracking server."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from segplatform.tracking import RunTracker, pending_records, sync_buffer


def _dead_uri() -> str:
    """An http URI on a loopback port with nothing listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def sqlite_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_records_reach_mlflow_in_order(tmp_path, sqlite_uri, monkeypatch):
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # artifacts must not follow the working directory
    tracker = RunTracker(sqlite_uri, "exp", "run-a", buffer_dir=tmp_path / "buf", tags={"k": "v"})
    tracker.log_params({"lr": 0.01, "bins": (1, 2, 3, 6)})
    for step in range(5):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    tracker.log_image(np.zeros((8, 8, 3), np.uint8), "overlay.png", "overlays")
    tracker.log_table({"class": ["a", "b"], "iou": [0.5, 0.25]}, "iou.json")
    assert tracker.finish(timeout=60)

    client = MlflowClient(sqlite_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.01"
    assert run.data.params["bins"] == "[1, 2, 3, 6]"
    assert run.data.tags["k"] == "v"
    history = client.get_metric_history(tracker.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2, 3, 4]
    assert history[-1].value == pytest.approx(0.2)
    names = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"overlays", "iou.json"} <= names
    # Beside the database, under the experiment's name; nothing in the working directory.
    stored = tmp_path / "mlruns" / "exp" / tracker.run_id / "artifacts"
    assert (stored / "iou.json").is_file() and (stored / "overlays" / "overlay.png").is_file()
    assert list(workdir.iterdir()) == []


def test_same_run_key_continues_the_run(tmp_path, sqlite_uri):
    first = RunTracker(sqlite_uri, "exp", "attempt", buffer_dir=tmp_path / "b1", run_key="key")
    first.log_metrics({"step_metric": 1.0}, step=1)
    assert first.flush(30)
    # The first attempt dies without finishing; the resumed attempt finds the same run.
    second = RunTracker(sqlite_uri, "exp", "attempt", buffer_dir=tmp_path / "b2", run_key="key")
    second.log_metrics({"step_metric": 2.0}, step=2)
    assert second.finish(timeout=30)
    assert second.run_id == first.run_id
    client = MlflowClient(sqlite_uri)
    assert [m.step for m in client.get_metric_history(first.run_id, "step_metric")] == [1, 2]
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_unreachable_server_never_blocks_and_buffer_syncs_later(tmp_path, sqlite_uri, caplog):
    buffer = tmp_path / "buf"
    tracker = RunTracker(_dead_uri(), "exp", "offline", buffer_dir=buffer, retry_interval=0.2)
    tracker.log_params({"lr": 0.1})
    for step in range(50):
        tracker.log_metrics({"loss": float(step)}, step=step)
    assert not tracker.finish(timeout=1.0)
    assert "unreachable" in caplog.text
    left = pending_records(buffer)
    assert left[0]["op"] == "start" and left[-1]["op"] == "end"

    sent = sync_buffer(buffer, tracking_uri=sqlite_uri)
    assert sent == len(left)
    assert pending_records(buffer) == []
    client = MlflowClient(sqlite_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 50


def test_a_refused_record_is_left_out_and_the_rest_still_lands(tmp_path, sqlite_uri, caplog):
    tracker = RunTracker(sqlite_uri, "exp", "run-r", buffer_dir=tmp_path / "buf", retry_interval=60)
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_metrics({"bad|name": 2.0}, step=2)  # MLflow refuses this name (HTTP 400)
    tracker.log_metrics({"loss": 0.5}, step=3)
    tracker.set_tags({"after": "yes"})
    # A retry would wait retry_interval (60 s): finishing within the timeout means no retry.
    assert tracker.finish(timeout=30)

    client = MlflowClient(sqlite_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [1, 3]
    assert run.data.tags["after"] == "yes"
    rejected = [json.loads(line) for line in (tmp_path / "buf" / "rejected.jsonl").open()]
    assert [(r["op"], r["args"]["metrics"]) for r in rejected] == [("metrics", {"bad|name": 2.0})]
    assert "bad|name" in rejected[0]["reason"]
    assert pending_records(tmp_path / "buf") == []
    assert any("refused the 'metrics' record" in message for message in caplog.messages)


def _register(sqlite_uri, tmp_path, name, score, *, dataset="s3://b/voc", promote="if_better"):
    """One run that logs a small package and registers it with ``val_miou = score``."""
    package = tmp_path / f"package-{name}-{score}"
    package.mkdir()
    (package / "model.json").write_text("{}")
    tracker = RunTracker(sqlite_uri, "exp", f"run-{score}", buffer_dir=package.with_suffix(".buf"))
    tracker.log_artifacts(package, "model")
    tags = {"dataset": dataset, "manifest_version": "1"}
    if score is not None:
        tags["val_miou"] = str(score)
    tracker.register_model("model", name, alias="champion", tags=tags, promote=promote)
    assert tracker.finish(timeout=60)
    (registration,) = tracker.registrations
    return registration


def test_champion_moves_only_to_a_version_at_least_as_good_on_the_same_data(tmp_path, sqlite_uri):
    first = _register(sqlite_uri, tmp_path, "m", 0.5)
    assert (first.version, first.alias, first.reason) == ("1", "champion", "first champion")
    worse = _register(sqlite_uri, tmp_path, "m", 0.4)
    assert worse.alias is None
    assert worse.reason == "champion stays on version 1: val_miou 0.4000 < 0.5000"
    better = _register(sqlite_uri, tmp_path, "m", 0.6)
    assert better.alias == "champion" and "0.6000 >= 0.5000 of version 1" in better.reason
    unscored = _register(sqlite_uri, tmp_path, "m", None)
    assert unscored.alias is None and "has no val_miou" in unscored.reason
    other_data = _register(sqlite_uri, tmp_path, "m", 0.1, dataset="s3://b/cityscapes")
    assert other_data.alias == "champion" and "scores not comparable" in other_data.reason
    forced = _register(
        sqlite_uri, tmp_path, "m", 0.05, dataset="s3://b/cityscapes", promote="always"
    )
    assert forced.alias == "champion"
    kept = _register(sqlite_uri, tmp_path, "m", 0.9, dataset="s3://b/cityscapes", promote="never")
    assert kept.alias is None

    client = MlflowClient(sqlite_uri)
    assert str(client.get_model_version_by_alias("m", "champion").version) == forced.version == "6"
    # Every version says why the alias moved or not.
    assert client.get_model_version("m", worse.version).tags["promotion"] == worse.reason
    with pytest.raises(ValueError, match="promote must be one of"):
        RunTracker.register_model(None, "model", "m", promote="sometimes")


def test_concurrent_registrations_leave_the_champion_on_the_best(tmp_path, sqlite_uri):
    """Registrations that decide at the same time (each reads the holder, then moves the
    alias) end with the alias on the best of them, whatever order their writes land in."""
    import threading

    first = _register(sqlite_uri, tmp_path, "race", 0.3)
    assert first.alias == "champion"
    scores = [0.61, 0.42, 0.58, 0.35, 0.49, 0.66, 0.52, 0.44]
    start = threading.Barrier(len(scores))
    results: dict[float, object] = {}

    def register(score: float) -> None:
        start.wait()
        results[score] = _register(sqlite_uri, tmp_path, "race", score)

    threads = [threading.Thread(target=register, args=(score,)) for score in scores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == len(scores)
    client = MlflowClient(sqlite_uri)
    champion = client.get_model_version_by_alias("race", "champion")
    assert float(champion.tags["val_miou"]) == max(scores)
    # As if they had come one at a time: those that say they took the alias, in registration
    # order, score higher and higher and end with the champion (a registration that finished
    # before a better one was registered took it first, then handed it on).
    moved = sorted(
        ((int(r.version), score) for score, r in results.items() if r.alias == "champion")
    )
    assert moved[-1][0] == int(champion.version), moved
    assert [score for _, score in moved] == sorted(score for _, score in moved), moved
    for registration in results.values():
        tag = client.get_model_version("race", registration.version).tags["promotion"]
        assert tag == registration.reason
