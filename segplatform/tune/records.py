"""A sweep's MLflow records: the parent run, its children's end, the registered winner.

- ``open_parent``: the sweep's MLflow run, created by the sweep's driver before any trial starts
  (experiment first, so that no two trial processes create the database schema or the experiment
  at once; ENVIRONMENT.md, "Ray Tune over Train V2"). It carries the tag ``segplatform.run_key``
  = ``sweep:<name>``, so a restored sweep finds and continues it. The trials' runs nest under it
  through ``TrainConfig.mlflow_parent_run`` (tag ``mlflow.parentRunId``).
- ``end_child``: a trial the scheduler stopped dies inside its run, whose MLflow run would stay
  RUNNING; the driver ends it KILLED (FAILED for a trial in error). A run that already ended
  keeps its status.
- ``register_version``: the best trial's best checkpoint becomes a version of a registered model
  (tagged by the sweep like a training run's version, plus the sweep and trial), and the alias
  moves by the same ``promote`` rule as a training run's (``segplatform.tracking``, the
  delivery code of ``RunTracker.register_model``). The version's source is the trial's own
  MLflow run: its ``model/`` package, logged there from the checkpoint if the trial did not log
  it (a trial stopped early). The trial's run is otherwise left as it is (status, end time).

Synchronous client calls happen only in the driver, outside any training process, with the
client's retries and timeout lowered (``segplatform.tracking``); the parent's end records
(results, figure, tags) go through a ``RunTracker``, which keeps them in a buffer when the
server is unreachable (``segplatform tracking sync``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "SWEEP_TAG",
    "end_child",
    "find_run",
    "open_parent",
    "parent_key",
    "register_version",
]

SWEEP_TAG = "segplatform.sweep"
TRIAL_TAG = "segplatform.sweep_trial"


def client(uri: str) -> Any:
    """An MLflow client with short retries and timeout (a dead server fails fast)."""
    from mlflow.tracking import MlflowClient

    from segplatform.tracking import fail_fast

    fail_fast()
    # Ending a run prints a "View run ... at" link per run: the sweep's lines say it already.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, experiment: str) -> str:
    """The experiment's id, created (with its artifacts beside a SQLite database) if missing."""
    from segplatform.tracking import local_artifact_location

    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    return mlflow_client.create_experiment(
        experiment, artifact_location=local_artifact_location(uri, experiment)
    )


def find_run(uri: str, experiment: str, run_key: str) -> Any | None:
    """The MLflow run with tag ``segplatform.run_key`` = ``run_key``, or None."""
    from segplatform.tracking import RUN_KEY_TAG

    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = mlflow_client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'"
    )
    return runs[0] if runs else None


def parent_key(sweep: str, sweep_id: str) -> str:
    """The run key of a sweep's parent run: ``sweep:<name>:<id>`` (the id is drawn when the sweep
    starts and kept in its storage, so a new sweep reusing a name gets a run of its own)."""
    return f"sweep:{sweep}:{sweep_id}"


def open_parent(
    uri: str, experiment: str, sweep: str, key: str, tags: dict[str, str]
) -> tuple[str, bool]:
    """``(run id, resumed)`` of the sweep's parent run: found again by its ``key``, else created."""
    from segplatform.tracking import RUN_KEY_TAG

    mlflow_client = client(uri)
    exp_id = experiment_id(uri, experiment)
    existing = find_run(uri, experiment, key)
    if existing is not None:
        mlflow_client.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id, True
    run = mlflow_client.create_run(
        exp_id, run_name=sweep, tags={RUN_KEY_TAG: key, SWEEP_TAG: sweep, **tags}
    )
    return run.info.run_id, False


def end_child(uri: str, experiment: str, run_name: str, status: str) -> str | None:
    """End the trial run ``run_name`` with ``status`` if it is still RUNNING; returns the status
    it had (None: no such run). Never raises: a tracking outage only logs a warning."""
    try:
        run = find_run(uri, experiment, run_name)
        if run is None:
            return None
        if run.info.status == "RUNNING":
            client(uri).set_terminated(run.info.run_id, status=status)
        return str(run.info.status)
    except Exception as err:
        logger.warning("could not end MLflow run %s as %s: %s", run_name, status, err)
        return None


def end_running_children(uri: str, experiment: str, parent_id: str, status: str) -> list[str]:
    """End every child of the parent still RUNNING (runs of trials interrupted by a PBT clone or
    stopped while their workers were still reporting); returns their names."""
    try:
        mlflow_client = client(uri)
        exp_id = experiment_id(uri, experiment)
        runs = mlflow_client.search_runs(
            [exp_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and "
            "attributes.status = 'RUNNING'",
        )
        for run in runs:
            mlflow_client.set_terminated(run.info.run_id, status=status)
        return [run.info.run_name for run in runs]
    except Exception as err:
        logger.warning("could not end the sweep's running child runs: %s", err)
        return []


def has_model(uri: str, run_id: str) -> bool:
    """Whether the run holds a model package under ``model/``."""
    try:
        return any(
            a.path == "model/model.json" for a in client(uri).list_artifacts(run_id, "model")
        )
    except Exception:
        return False


def register_version(
    uri: str,
    experiment: str,
    run_id: str,
    *,
    package_dir: str | None,
    name: str,
    alias: str,
    tags: dict[str, str],
    promote: str,
) -> Any:
    """Register ``runs:/<run_id>/model`` as a version of ``name`` and move ``alias`` by the
    ``promote`` rule; ``package_dir`` is logged there first when given. Returns the
    ``segplatform.tracking.Registration``; raises when MLflow refuses or is unreachable."""
    from pathlib import Path

    from segplatform.tracking import _Delivery

    if package_dir is not None:
        client(uri).log_artifacts(run_id, package_dir, "model")
    delivery = _Delivery(uri, experiment)
    delivery.run_id = run_id
    args = {
        "artifact_path": "model",
        "name": name,
        "alias": alias,
        "promote": promote,
        "tags": {k: str(v) for k, v in tags.items()},
    }
    registry_log = logging.getLogger("mlflow.store.model_registry.abstract_store")
    level = registry_log.level
    registry_log.setLevel(logging.WARNING)  # "waiting for model version to finish creation"
    try:
        delivery.send("register", args, Path(package_dir or "."))
    finally:
        registry_log.setLevel(level)
    return delivery.registrations[-1]
