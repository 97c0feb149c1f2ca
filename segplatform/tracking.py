"""MLflow tracking that never blocks or kills training.

``RunTracker`` hands every record (params, metrics, tags, artifacts, images, tables, model
registration, run end) to a background thread. Each record is first appended to a write-ahead
log in ``buffer_dir`` (``records.jsonl``; artifact files are copied beside it), then delivered in
order. When the tracking server is unreachable the thread keeps the records, warns once, and
retries; on recovery it sends everything in order. If the server is still down when the run ends,
``finish`` stops waiting after ``give_up_after`` seconds (the end of a training run is not held up
by a dead server), the records stay in the buffer, a warning names the buffer, and
``segplatform tracking sync BUFFER_DIR`` uploads them later.

A record the server answers and refuses (an HTTP 4xx such as an invalid metric name: retrying
cannot help) is left out with a warning and kept in ``rejected.jsonl`` in the buffer, so that one
bad record never holds up the ones behind it.

A run is identified by a ``run_key`` (the Ray Train run name): a resumed training attempt finds
and continues its MLflow run (tag ``segplatform.run_key``) instead of opening a new one.

A dead server blocks each synchronous MLflow client call for about a minute (its retries), so the
tracker lowers the client's retries and timeout for this process (``MLFLOW_HTTP_REQUEST_*``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

RECORDS = "records.jsonl"
DELIVERED = "delivered"
REJECTED = "rejected.jsonl"
RUN_KEY_TAG = "segplatform.run_key"


class NoRunError(RuntimeError):
    """A record came after a ``start`` record the server refused: there is no run to log to."""


# How ``register_model`` moves the alias: "if_better" (the new version's ``val_miou`` tag is at
# least the current holder's, on the same dataset and manifest version), "always" or "never".
PROMOTION_POLICIES = ("if_better", "always", "never")
# Tags that must match for two versions' scores to be compared.
COMPARABLE_TAGS = ("dataset", "manifest_version", "dataset_revision")
# The ``promotion`` tag of a version whose if_better decision is under way, and how long one
# may take (``_Delivery._promote_if_better``).
DECIDING = "deciding (if_better)"
DECIDING_S = 600.0
# How waiting for delivery ended (``RunTracker._wait_delivered``).
_SENT, _UNREACHABLE, _TIMED_OUT = "sent", "unreachable", "timed out"


@dataclass
class Registration:
    """The model version a ``register_model`` record produced."""

    name: str
    version: str
    alias: str | None  # the alias moved to this version; None when it stayed where it was
    reason: str = ""  # why the alias moved or stayed (also the version's tag "promotion")


class _Delivery:
    """Sends records to MLflow (used by the tracker thread and by ``sync``)."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_id: str | None = None
        self.registrations: list[Registration] = []

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(
                self.experiment,
                artifact_location=local_artifact_location(self.tracking_uri, self.experiment),
            )
        except Exception:  # created concurrently by another process
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def send(self, op: str, args: dict[str, Any], files_dir: Path) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client = self.client
        if op == "start":
            experiment_id = self._experiment_id()
            existing = client.search_runs(
                [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{args['run_key']}'"
            )
            if existing:
                self.run_id = existing[0].info.run_id
                client.update_run(self.run_id, status="RUNNING")
            else:
                tags = {RUN_KEY_TAG: args["run_key"], **args.get("tags", {})}
                run = client.create_run(experiment_id, run_name=args["run_name"], tags=tags)
                self.run_id = run.info.run_id
            return
        if self.run_id is None:
            raise NoRunError("no MLflow run: the tracking server refused the 'start' record")
        run_id = self.run_id
        if op == "params":
            params = [Param(k, str(v)[:6000]) for k, v in args["params"].items()]
            for i in range(0, len(params), 100):
                try:
                    client.log_batch(run_id, params=params[i : i + 100])
                except Exception as err:  # a resumed run re-logs the same params
                    if "already logged" not in str(err) and "INVALID_PARAMETER" not in str(err):
                        raise
        elif op == "metrics":
            stamp = int(args["time"] * 1000)
            metrics = [
                Metric(k, float(v), stamp, int(args["step"]))
                for k, v in args["metrics"].items()
                if v is not None and np.isfinite(float(v))
            ]
            if metrics:
                client.log_batch(run_id, metrics=metrics)
        elif op == "tags":
            client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in args["tags"].items()])
        elif op == "artifacts":
            local = files_dir / args["local"]
            if local.is_dir():
                client.log_artifacts(run_id, str(local), args.get("artifact_path"))
            else:
                client.log_artifact(run_id, str(local), args.get("artifact_path"))
        elif op == "register":
            self._register(run_id, args)
        elif op == "end":
            client.set_terminated(run_id, status=args["status"])
        else:
            raise ValueError(f"unknown tracking record {op!r}")

    def _register(self, run_id: str, args: dict[str, Any]) -> None:
        name = args["name"]
        try:
            self.client.create_registered_model(name)
        except Exception as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err) and "already exists" not in str(err):
                raise
        source = f"runs:/{run_id}/{args['artifact_path']}"
        alias = args.get("alias")
        policy = args.get("promote", "always")
        tags = dict(args.get("tags") or {})
        if alias and policy == "if_better":
            tags["promotion"] = DECIDING  # replaced by the decision below
            tags["promote"] = policy  # for good: later registrations weigh this version
        version = self.client.create_model_version(
            name, source=source, run_id=run_id, tags=tags or None
        )
        moved, reason = False, "no alias requested"
        if alias and policy == "if_better":
            moved, reason = self._promote_if_better(name, alias, version)
        elif alias:
            moved, reason = self._promotion(name, alias, policy, version.tags or {}, None)
            if moved:
                self.client.set_registered_model_alias(name, alias, version.version)
        if alias:  # the decision, last: a version without it is still deciding (see below)
            self.client.set_model_version_tag(name, version.version, "promotion", reason)
        self.registrations.append(
            Registration(name, str(version.version), alias if moved else None, reason)
        )

    def _holder(self, name: str, alias: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException:  # no version holds the alias yet
            return None

    def _promote_if_better(self, name: str, alias: str, version: Any) -> tuple[bool, str]:
        """``if_better``, safe against registrations deciding at the same time.

        Reading the holder and then moving the alias is not atomic: two registrations that read
        the same holder would both move it, and the later write would win even if its version
        scored lower. So each one considers, besides the holder, every version registered after
        the holder that asked for ``if_better`` (tag ``promote``, set at creation; or still
        ``DECIDING``), within the last ``DECIDING_S`` seconds, decided or not: a version that
        took the alias and was then overwritten by a registration that had read an older state
        is weighed again. The alias goes to the best of them by the rule of ``_promotion``
        folded in registration order, and the registration reads the holder again until it is
        that version. Whichever finishes last then leaves the alias on the best of the
        concurrent versions, as if they had come one at a time.
        """
        mine = str(version.version)
        reason = ""
        for _ in range(20):
            holder = self._holder(name, alias)
            held = None if holder is None else str(holder.version)
            recent = time.time() * 1000 - DECIDING_S * 1000
            candidates = {
                str(v.version): v
                for v in self.client.search_model_versions(f"name = '{name}'")
                if (
                    (v.tags or {}).get("promote") == "if_better"
                    or (v.tags or {}).get("promotion") == DECIDING
                )
                and (v.creation_timestamp or 0) >= recent
                and (held is None or int(v.version) > int(held))
            }
            candidates[mine] = version
            best = holder
            for key in sorted(candidates, key=int):  # in registration order, one at a time
                contender = candidates[key]
                takes, why = self._promotion(name, alias, "if_better", contender.tags or {}, best)
                if takes:
                    best = contender
                if key == mine and not reason:
                    reason = why  # my version against what held the alias before it
            if best is None or str(best.version) == held:
                break
            self.client.set_registered_model_alias(name, alias, best.version)
        # Whether the alias rests on my version is what my last look decided: a registration
        # that read an older state may still be writing, and the last of them to finish moves
        # the alias to the same best version, so the holder read now could be a passing one.
        moved = best is not None and str(best.version) == mine
        if not moved and best is not None and not reason.startswith(f"{alias} stays"):
            reason = (
                f"{alias} stays on version {best.version}, registered at the same time and "
                "scoring at least as well"
            )
        return moved, reason

    def _promotion(
        self, name: str, alias: str, policy: str, tags: dict[str, str], current: Any
    ) -> tuple[bool, str]:
        """Whether a version with ``tags`` takes ``alias`` from ``current`` (its holder, or
        None), and why (see ``PROMOTION_POLICIES``)."""
        if policy == "never":
            return False, f"promote=never: {alias} not moved"
        if policy == "always":
            return True, f"promote=always: {alias} moved"
        if current is None:
            return True, f"first {alias}"
        held = f"version {current.version}"
        if any(current.tags.get(key) != tags.get(key) for key in COMPARABLE_TAGS):
            return True, f"{alias} moved from {held}, trained on other data (scores not comparable)"
        new, old = _score(tags.get("val_miou")), _score(current.tags.get("val_miou"))
        if old is None:
            return True, f"{alias} moved from {held}, which has no val_miou"
        if new is None:
            return False, f"{alias} stays on {held}: this version has no val_miou"
        if new >= old:
            return True, f"val_miou {new:.4f} >= {old:.4f} of {held}"
        return False, f"{alias} stays on {held}: val_miou {new:.4f} < {old:.4f}"


class RunTracker:
    """Non-blocking MLflow logging for one training run (see the module docstring)."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        *,
        buffer_dir: str | os.PathLike,
        run_key: str | None = None,
        tags: dict[str, Any] | None = None,
        retry_interval: float = 2.0,
        give_up_after: float = 15.0,
    ) -> None:
        """``retry_interval``: seconds between delivery attempts while the server is down.
        ``give_up_after``: how long ``finish`` keeps retrying a server that does not answer."""
        fail_fast()
        self.tracking_uri = tracking_uri
        self.buffer_dir = Path(buffer_dir)
        self.files_dir = self.buffer_dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.retry_interval = retry_interval
        self.give_up_after = give_up_after
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: list[tuple[int, str, dict[str, Any]]] = []
        self._seq = _last_seq(self.buffer_dir)
        self._closed = False
        self._outage_warned = False
        self._unreachable_since: float | None = None  # monotonic time of the first failed send
        self._delivery = _Delivery(tracking_uri, experiment)
        _write_meta(self.buffer_dir, tracking_uri, experiment)
        self._thread = threading.Thread(target=self._run, name="mlflow-tracker", daemon=True)
        self._thread.start()
        self._record(
            "start", {"run_key": run_key or run_name, "run_name": run_name, "tags": tags or {}}
        )

    # ---- public API: every call returns at once ---------------------------------------------

    @staticmethod
    def disabled() -> NullTracker:
        return NullTracker()

    @property
    def run_id(self) -> str | None:
        return self._delivery.run_id

    @property
    def registrations(self) -> list[Registration]:
        return list(self._delivery.registrations)

    def log_params(self, params: dict[str, Any]) -> None:
        self._record("params", {"params": {k: _jsonable(v) for k, v in params.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.number))}
        self._record("metrics", {"metrics": values, "step": int(step), "time": time.time()})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._record("tags", {"tags": {k: str(v) for k, v in tags.items()}})

    def log_artifacts(
        self, local_path: str | os.PathLike, artifact_path: str | None = None
    ) -> None:
        """Copy ``local_path`` (file or directory) into the buffer now; upload it later."""
        seq = self._next_seq()
        source = Path(local_path)
        target = self.files_dir / str(seq) / source.name
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        local = str(target.relative_to(self.files_dir))
        self._record("artifacts", {"local": local, "artifact_path": artifact_path}, seq=seq)

    def log_image(self, image: np.ndarray, name: str, artifact_path: str | None = None) -> None:
        from PIL import Image

        seq = self._next_seq()
        target = self.files_dir / str(seq) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(target)
        local = str(target.relative_to(self.files_dir))
        self._record("artifacts", {"local": local, "artifact_path": artifact_path}, seq=seq)

    def log_figure(self, figure: Any, name: str, artifact_path: str | None = None) -> None:
        seq = self._next_seq()
        target = self.files_dir / str(seq) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(target, dpi=100, bbox_inches="tight")
        local = str(target.relative_to(self.files_dir))
        self._record("artifacts", {"local": local, "artifact_path": artifact_path}, seq=seq)

    def log_table(
        self, table: dict[str, list], name: str, artifact_path: str | None = None
    ) -> None:
        """A JSON table (column name → values) as an artifact, readable by ``mlflow.load_table``."""
        seq = self._next_seq()
        target = self.files_dir / str(seq) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        columns = list(table)
        rows = list(zip(*(table[c] for c in columns)))
        target.write_text(json.dumps({"columns": columns, "data": [list(r) for r in rows]}))
        local = str(target.relative_to(self.files_dir))
        self._record("artifacts", {"local": local, "artifact_path": artifact_path}, seq=seq)

    def register_model(
        self,
        artifact_path: str,
        name: str,
        *,
        alias: str | None = "champion",
        tags: dict[str, str] | None = None,
        promote: str = "always",
    ) -> None:
        """Register ``runs:/<run>/<artifact_path>`` (a logged model package) as a version and
        move ``alias`` to it according to ``promote`` (``PROMOTION_POLICIES``; "if_better"
        compares the ``val_miou`` tags). The outcome is in ``registrations`` once delivered."""
        if promote not in PROMOTION_POLICIES:
            raise ValueError(f"promote must be one of {PROMOTION_POLICIES}, got {promote!r}")
        args = {"artifact_path": artifact_path, "name": name, "alias": alias, "promote": promote}
        args["tags"] = {k: str(v) for k, v in (tags or {}).items()}
        self._record("register", args)

    def finish(self, status: str = "FINISHED", timeout: float = 120.0) -> bool:
        """End the run and wait for delivery; False if records remain in the buffer.

        Waits up to ``timeout`` s while records are being delivered, but only ``give_up_after``
        s while the server does not answer.
        """
        self._record("end", {"status": status})
        outcome = self._wait_delivered(timeout, give_up_after=self.give_up_after)
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        if outcome != _SENT:
            why = (
                f"is unreachable (no answer for {self.give_up_after:g} s)"
                if outcome == _UNREACHABLE
                else f"did not take every record within {timeout:g} s"
            )
            logger.warning(
                "MLflow at %s %s: %d tracking record(s) kept in %s; upload them "
                "with `segplatform tracking sync %s`",
                self.tracking_uri,
                why,
                len(self._pending),
                self.buffer_dir,
                self.buffer_dir,
            )
        return outcome == _SENT

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until every record so far is delivered (True) or ``timeout`` passes (False)."""
        return self._wait_delivered(timeout) == _SENT

    def _wait_delivered(self, timeout: float, give_up_after: float | None = None) -> str:
        """``_SENT``, ``_UNREACHABLE`` (no answer for ``give_up_after`` s) or ``_TIMED_OUT``."""
        start = time.monotonic()
        deadline = start + timeout
        with self._lock:
            while self._pending:
                now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    return _TIMED_OUT
                since = self._unreachable_since  # no answer from the server since then
                if (
                    give_up_after is not None
                    and since is not None
                    and now - max(since, start) >= give_up_after
                ):
                    return _UNREACHABLE
                self._wake.wait(min(left, 0.5))
        return _SENT

    # ---- internals ---------------------------------------------------------------------------

    def _next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def _record(self, op: str, args: dict[str, Any], *, seq: int | None = None) -> None:
        if seq is None:
            seq = self._next_seq()
        line = json.dumps({"seq": seq, "op": op, "args": args})
        with self._lock:
            with open(self.buffer_dir / RECORDS, "a") as f:
                f.write(line + "\n")
            self._pending.append((seq, op, args))
            self._pending.sort(key=lambda r: r[0])
            self._wake.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if not self._pending:
                    return
                seq, op, args = self._pending[0]
            try:
                self._delivery.send(op, args, self.files_dir)
            except Exception as err:
                if is_rejection(err):
                    reject_record(self.buffer_dir, seq, op, args, err, self.tracking_uri)
                    with self._lock:
                        self._unreachable_since = None
                        self._pending.pop(0)
                        (self.buffer_dir / DELIVERED).write_text(str(seq))
                        self._wake.notify_all()
                    continue
                with self._lock:
                    if self._unreachable_since is None:
                        self._unreachable_since = time.monotonic()
                if not self._outage_warned:
                    logger.warning(
                        "MLflow at %s unreachable (%s); training goes on, records are kept in "
                        "%s and sent when it is back",
                        self.tracking_uri,
                        _reason(err),
                        self.buffer_dir,
                    )
                    self._outage_warned = True
                with self._lock:
                    if self._closed:
                        return
                    self._wake.wait(self.retry_interval)
                continue
            if self._outage_warned:
                logger.warning("MLflow at %s is reachable again", self.tracking_uri)
                self._outage_warned = False
            with self._lock:
                self._unreachable_since = None
                self._pending.pop(0)
                (self.buffer_dir / DELIVERED).write_text(str(seq))
                self._wake.notify_all()


class NullTracker:
    """Tracking switched off: the same interface, nothing recorded."""

    run_id = None
    registrations: tuple[Registration, ...] = ()

    def __getattr__(self, name: str):
        if name in ("finish", "flush"):
            return lambda *a, **k: True
        return lambda *a, **k: None


def fail_fast() -> None:
    """Short MLflow client retries and timeout for this process (``MLFLOW_HTTP_REQUEST_*``,
    unless set): a server that does not answer fails a call in seconds instead of minutes of
    backoff, and the caller (buffered tracker, sweep records, Serve's alias watch) retries on its
    own schedule."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _reason(err: BaseException) -> str:
    """A short cause of a failed delivery (``[Errno 111] Connection refused``, not a URL dump)."""
    text = str(err)
    errno = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    if errno:
        return errno.group(0).strip()
    _, found, cause = text.partition("failed with exception ")  # MLflow's HTTP client errors
    lines = (cause if found else text).splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def local_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where the artifacts of a new experiment go for a ``sqlite:///`` tracking URI: the
    ``mlruns/`` directory beside the database file (MLflow's own default, ``./mlruns``, is relative
    to the working directory of whichever process creates the experiment, e.g. a Ray worker's
    temporary directory). None for a tracking server, which decides itself."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri[len("sqlite:///") :]).resolve()
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("_") or "experiment"
    return (database.parent / "mlruns" / folder).as_uri()


def is_rejection(err: BaseException) -> bool:
    """Whether the tracking server answered and refused a record (HTTP 4xx other than 408 and
    429), as opposed to being unreachable or failing (5xx): only then is retrying useless."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, NoRunError):
        return True
    if not isinstance(err, MlflowException):
        return False
    status = err.get_http_status_code()
    return 400 <= status < 500 and status not in (408, 429)


def reject_record(
    buffer_dir: Path, seq: int, op: str, args: dict[str, Any], err: BaseException, uri: str
) -> None:
    """Leave a refused record out: warn, and keep it in ``rejected.jsonl`` with the reason."""
    reason = _reason(err)
    logger.warning(
        "MLflow at %s refused the %r record #%d (%s); it is left out and kept in %s",
        uri,
        op,
        seq,
        reason,
        buffer_dir / REJECTED,
    )
    line = json.dumps({"seq": seq, "op": op, "args": args, "reason": reason})
    with open(buffer_dir / REJECTED, "a") as f:
        f.write(line + "\n")


def _score(text: str | None) -> float | None:
    """A ``val_miou`` tag as a number; None when missing or not a finite number."""
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and np.isfinite(value) else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return json.dumps(value, default=str)


def _write_meta(buffer_dir: Path, tracking_uri: str, experiment: str) -> None:
    meta = {"tracking_uri": tracking_uri, "experiment": experiment}
    (buffer_dir / "tracker.json").write_text(json.dumps(meta))


def _last_seq(buffer_dir: Path) -> int:
    records = buffer_dir / RECORDS
    if not records.exists():
        return 0
    last = 0
    for line in records.read_text().splitlines():
        if line.strip():
            last = max(last, json.loads(line)["seq"])
    return last


def pending_records(buffer_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a buffer that were not delivered, in order."""
    buffer = Path(buffer_dir)
    records_file = buffer / RECORDS
    if not records_file.exists():
        raise FileNotFoundError(f"{buffer}: no tracking buffer ({RECORDS} missing)")
    delivered_file = buffer / DELIVERED
    delivered = int(delivered_file.read_text()) if delivered_file.exists() else 0
    records = [json.loads(line) for line in records_file.read_text().splitlines() if line.strip()]
    return sorted((r for r in records if r["seq"] > delivered), key=lambda r: r["seq"])


def sync_buffer(buffer_dir: str | os.PathLike, tracking_uri: str | None = None) -> int:
    """Upload the undelivered records of a tracking buffer; return how many were sent (records
    the server refuses are left out, see ``reject_record``).

    The run is found again through its ``start`` record's run key, so records resume the same
    MLflow run.
    """
    buffer = Path(buffer_dir)
    meta = json.loads((buffer / "tracker.json").read_text())
    delivery = _Delivery(tracking_uri or meta["tracking_uri"], meta["experiment"])
    records = pending_records(buffer)
    all_records = [
        json.loads(line) for line in (buffer / RECORDS).read_text().splitlines() if line.strip()
    ]
    start = next((r for r in all_records if r["op"] == "start"), None)
    if start is None:
        raise ValueError(f"{buffer}: the buffer has no 'start' record")
    if not records or records[0]["op"] != "start":
        delivery.send("start", start["args"], buffer / "files")
    sent = 0
    for record in records:
        try:
            delivery.send(record["op"], record["args"], buffer / "files")
            sent += 1
        except Exception as err:
            if not is_rejection(err):
                raise
            reject_record(
                buffer, record["seq"], record["op"], record["args"], err, delivery.tracking_uri
            )
        (buffer / DELIVERED).write_text(str(record["seq"]))
    return sent
