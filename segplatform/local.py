"""The local platform: a Ray head, an MLflow server and an S3 server on 127.0.0.1.

``segplatform local up|status|down`` manage one platform whose whole state lives in one directory
(``--state-dir``, else ``$SEGPLATFORM_HOME``, else ``.segplatform/`` in the current directory)::

    state.json          pids, ports and addresses of the running services (removed by ``down``)
    env.sh              the ``export`` lines for clients (mode 0600: holds the S3 secret)
    s3/                 SeaweedFS data, ``credentials.json`` (generated once, mode 0600), weed.log
    mlflow/             mlflow.db (SQLite tracking + model registry), mlflow.log
    ray/                auth_token (mode 0600), ray.log, tmp/ (Ray's temp dir, when the path is
                        short enough for Ray's unix sockets; else a /tmp/segp-ray-* dir)
    ray/nodes/NAME/     ray.log of worker node NAME (its temp dir: tmp/ or /tmp/segp-node-*)

Services, in start order:

1. S3: SeaweedFS (``weed mini``) with the generated access key enforced, bucket ``segplatform``.
2. MLflow: ``mlflow server`` on SQLite; artifacts go to ``s3://segplatform/mlflow-artifacts`` on
   the local S3 server and are proxied by the tracking server (clients need only
   ``MLFLOW_TRACKING_URI``).
3. Ray head: dashboard and job server at ``RAY_ADDRESS``, token authentication on. The head's
   environment carries the ``MLFLOW_TRACKING_URI``, ``AWS_*`` and ``SEGPLATFORM_S3_BUCKET``
   variables, so jobs submitted with ``ray job submit`` reach the tracking server and S3 without
   further set-up.

4. Ray worker nodes (``up --nodes N`` starts N - 1 of them; ``add_node`` / ``remove_node``, the
   CLI's ``local node add|remove``, change them later): extra raylets on this machine
   (``segplatform.services.ray_node``) that join ``ray_head.gcs_address`` with the head's token
   and the same MLflow and S3 settings, recorded in ``state.json["services"]["ray_nodes"]``.
   ``num_cpus`` is per node, and logical: two 1-CPU nodes fit a 2-core machine. Nodes are named
   ``node-1``, ``node-2``, ... (never reused within one platform); the head is ``head``.

A failure at any step stops what was already started. Data (runs, registered models, S3 objects)
survives ``down`` and is served again by the next ``up``. Every process started for one ``up``
carries a random instance id in its environment, which ``down`` uses to find stragglers; other
users' and engineers' Ray clusters are never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shlex
import string
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from segplatform.services.mlflow_server import MLflowServer
from segplatform.services.process import (
    kill_processes,
    port_is_open,
    processes_marked,
    terminate_process_group,
)
from segplatform.services.ray_head import RayHead, RayHeadError
from segplatform.services.ray_node import RayNodeError, RayWorkerNode

# Environment variable naming the state directory when --state-dir is not given.
HOME_ENV_VAR = "SEGPLATFORM_HOME"
# State directory (relative to the current directory) when neither is given.
DEFAULT_STATE_DIR = ".segplatform"
# Bucket created on the local S3 server for datasets, checkpoints and MLflow artifacts.
BUCKET = "segplatform"
# Region reported to S3 clients (SeaweedFS accepts any).
REGION = "us-east-1"
STATE_FILE = "state.json"
ENV_FILE = "env.sh"
STATE_VERSION = 1
# Client variables ``up`` prints, in this order.
ENV_KEYS: tuple[str, ...] = (
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN_PATH",
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "SEGPLATFORM_S3_BUCKET",
    HOME_ENV_VAR,
)


class LocalPlatformError(RuntimeError):
    """The local platform could not be started, found or stopped."""


class ClusterAddressError(ValueError):
    """A Ray address that names a dashboard (HTTP) rather than a cluster to join."""


def cluster_address(address: str | None) -> str | None:
    """The Ray address to join: ``address`` or ``RAY_ADDRESS``; the dashboard URL of the local
    platform (what ``segplatform local env`` exports, for ``ray job submit``) is turned into its
    GCS address. None: start a local Ray. Another dashboard URL raises ``ClusterAddressError``
    (``ray.init`` cannot join through the dashboard)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None or not address.startswith(("http://", "https://")):
        return address
    with contextlib.suppress(Exception):
        state = LocalPlatform().read_state()
        head = (state or {}).get("services", {}).get("ray_head", {})
        if head.get("dashboard_url", "").rstrip("/") == address.rstrip("/"):
            return head["gcs_address"]
    raise ClusterAddressError(
        f"RAY_ADDRESS={address} is a dashboard URL: give the cluster's GCS address (HOST:PORT), "
        "or submit the command as a job: ray job submit --address URL -- ..."
    )


def resolve_state_dir(state_dir: str | os.PathLike[str] | None = None) -> Path:
    """``state_dir``, else ``$SEGPLATFORM_HOME``, else ``./.segplatform`` (absolute)."""
    chosen = state_dir or os.environ.get(HOME_ENV_VAR) or DEFAULT_STATE_DIR
    return Path(chosen).expanduser().resolve()


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 (atomically, via a temporary file)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)


def format_exports(env: dict[str, str]) -> str:
    """``export KEY=VALUE`` lines (shell-quoted) that ``eval`` can consume."""
    return "\n".join(f"export {key}={shlex.quote(env[key])}" for key in ENV_KEYS if key in env)


@dataclass(frozen=True)
class ServiceStatus:
    """The state of one service as ``status`` reports it."""

    name: str  # "s3", "mlflow" or "ray_head"
    address: str  # where clients reach it
    pid: int | None  # process (group leader) id
    alive: bool  # the process runs
    healthy: bool  # the service answered its health check
    detail: str  # what the health check saw


@dataclass(frozen=True)
class NodeStatus:
    """One Ray node of the local cluster as ``status`` reports it."""

    name: str  # "head", a worker node's name ("node-1"), "node-1 (removed)", or "-" (other)
    node_id: str | None  # Ray node id (hex); None before the node joined
    state: str  # "ALIVE" or "DEAD" (the cluster's view), "NOT JOINED" or "UNKNOWN" (head down)
    is_head: bool  # the head node (GCS, dashboard, job server)
    cpus: float  # logical CPUs the node offers
    gpus: float  # GPUs the node offers
    pid: int | None  # the node's `ray start --block` process
    process_alive: bool  # that process runs
    detail: str  # the cluster's message about the node (e.g. why it died)
    object_store_mb: float = 0.0  # the node's Ray object store (MiB; 0 when not known)


class LocalPlatform:
    """The services of one state directory. ``up``, ``status`` and ``down`` may run in different
    processes: everything they share is in ``state.json``."""

    def __init__(self, state_dir: str | os.PathLike[str] | None = None) -> None:
        self.state_dir = resolve_state_dir(state_dir)
        self.state_path = self.state_dir / STATE_FILE
        self.env_path = self.state_dir / ENV_FILE
        self.credentials_path = self.state_dir / "s3" / "credentials.json"

    # ------------------------------------------------------------------------------ state
    def read_state(self) -> dict[str, Any] | None:
        """The contents of ``state.json``, or None when the platform is not up."""
        try:
            text = self.state_path.read_text()
        except FileNotFoundError:
            return None
        try:
            state = json.loads(text)
        except json.JSONDecodeError as error:
            raise LocalPlatformError(f"{self.state_path}: not valid JSON ({error})") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise LocalPlatformError(
                f"{self.state_path}: unknown state version {state.get('version')!r} "
                f"(expected {STATE_VERSION}); run `segplatform local down` with the version "
                "that wrote it, or remove the file"
            )
        return state

    def env(self) -> dict[str, str]:
        """The client variables of the running platform (LocalPlatformError if it is not up)."""
        return dict(self._running_state()["env"])

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serializes ``up`` and ``down`` on one state directory."""
        if not self.state_dir.exists():
            self.state_dir.mkdir(parents=True, mode=0o700)  # holds the token and S3 secret
        with open(self.state_dir / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LocalPlatformError(
                    f"another `segplatform local` command is working on {self.state_dir}"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _credentials(self) -> tuple[str, str]:
        """The S3 access key and secret, generated on first use and kept (mode 0600)."""
        if self.credentials_path.exists():
            data = json.loads(self.credentials_path.read_text())
            return data["access_key"], data["secret_key"]
        alphabet = string.ascii_uppercase + string.digits
        access_key = "SEGP" + "".join(secrets.choice(alphabet) for _ in range(16))
        secret_key = secrets.token_urlsafe(30)
        self.credentials_path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(
            self.credentials_path,
            json.dumps({"access_key": access_key, "secret_key": secret_key}, indent=2),
        )
        return access_key, secret_key

    # ------------------------------------------------------------------------------ up
    def up(
        self,
        *,
        num_cpus: int | None = None,
        nodes: int = 1,
        timeout: float = 180.0,
        log: Callable[[str], None] = lambda message: None,
        head_object_store_mb: int | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Start the platform; returns ``(state, started)``, ``started`` False if already up.

        ``nodes`` Ray nodes in all: the head plus ``nodes - 1`` worker nodes joining it.
        ``num_cpus`` is per node (logical CPUs; default: all CPUs for one node, else the CPU
        count divided by ``nodes``, at least 1). ``head_object_store_mb`` caps the head's
        object store (Ray's default otherwise: 30% of memory). Raises LocalPlatformError (after
        stopping whatever it started) when a service fails.
        """
        if num_cpus is not None and num_cpus < 1:
            raise ValueError(f"num_cpus must be at least 1, got {num_cpus}")
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
            raise ValueError(f"nodes must be an int >= 1, got {nodes!r}")
        if num_cpus is None and nodes > 1:
            num_cpus = default_cpus_per_node(nodes)
        with self._locked():
            state = self.read_state()
            if state is not None:
                if any(status.alive for status in self._statuses(state)):
                    return state, False
                log("stale state from a platform that is no longer running: cleaning up")
                self._stop_all(state, log)
            return (
                self._start(
                    num_cpus=num_cpus,
                    nodes=nodes,
                    timeout=timeout,
                    log=log,
                    head_object_store_mb=head_object_store_mb,
                ),
                True,
            )

    def _start(
        self,
        *,
        num_cpus: int | None,
        nodes: int,
        timeout: float,
        log: Callable[[str], None],
        head_object_store_mb: int | None = None,
    ) -> dict[str, Any]:
        from segplatform.services.seaweed import SeaweedServer

        instance_id = uuid.uuid4().hex
        access_key, secret_key = self._credentials()
        started: list[Callable[[], None]] = []
        deadline = time.monotonic() + timeout
        s3 = mlflow = head = None
        try:
            begin = time.monotonic()
            s3 = SeaweedServer(self.state_dir / "s3", access_key=access_key, secret_key=secret_key)
            started.append(s3.stop)
            s3.start(timeout=max(1.0, deadline - time.monotonic()))
            s3.create_bucket(BUCKET)
            log(f"S3 (SeaweedFS)   {s3.endpoint_url}  ready in {time.monotonic() - begin:.1f} s")
            client_s3_env = {**s3.env(), "AWS_DEFAULT_REGION": REGION}

            begin = time.monotonic()
            mlflow = MLflowServer(
                self.state_dir / "mlflow",
                artifacts_destination=f"s3://{BUCKET}/mlflow-artifacts",
                env={"MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url, **client_s3_env},
                instance_id=instance_id,
            )
            started.append(mlflow.stop)
            mlflow.launch()

            head = RayHead(
                self.state_dir / "ray",
                num_cpus=num_cpus,
                instance_id=instance_id,
                object_store_bytes=(
                    None if head_object_store_mb is None else head_object_store_mb * 1024 * 1024
                ),
                env={
                    "MLFLOW_TRACKING_URI": mlflow.tracking_uri,
                    "SEGPLATFORM_S3_BUCKET": BUCKET,
                    **client_s3_env,
                },
            )
            started.append(head.stop)
            head.launch()

            mlflow.wait_ready(max(1.0, deadline - time.monotonic()))
            log(
                f"MLflow           {mlflow.tracking_uri}  ready in {time.monotonic() - begin:.1f} s"
            )
            head.wait_ready(max(1.0, deadline - time.monotonic()))
            log(f"Ray head         {head.dashboard_url}  ready in {time.monotonic() - begin:.1f} s")

            begin = time.monotonic()
            node_env = dict(head.extra_env)  # workers on every node reach MLflow and S3
            workers = []
            for index in range(1, nodes):
                node = self._new_node(head.to_record(), instance_id, index, num_cpus, node_env)
                started.append(lambda node=node: node.stop(force=True))
                workers.append(node.launch())
            for node in workers:
                node.wait_joined(head.cluster_nodes, max(1.0, deadline - time.monotonic()))
                log(
                    f"Ray node         {node.name} ({node.node_id[:12]}) joined in "
                    f"{time.monotonic() - begin:.1f} s"
                )

            env = {
                **head.env(),
                "MLFLOW_TRACKING_URI": mlflow.tracking_uri,
                **client_s3_env,
                "SEGPLATFORM_S3_BUCKET": BUCKET,
                HOME_ENV_VAR: str(self.state_dir),
            }
            state = {
                "version": STATE_VERSION,
                "instance_id": instance_id,
                "state_dir": str(self.state_dir),
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "services": {
                    "s3": {
                        "pid": s3.pid,
                        "endpoint_url": s3.endpoint_url,
                        "ports": dict(s3.ports),
                        "bucket": BUCKET,
                        "data_dir": str(s3.root_dir / "data"),
                        "log": str(s3.log_path),
                    },
                    "mlflow": mlflow.to_record(),
                    "ray_head": head.to_record(),
                    "ray_nodes": [node.to_record() for node in workers],
                },
                "nodes_started": nodes - 1,
                "env": env,
            }
            _write_private(self.env_path, format_exports(env) + "\n")
            _write_private(self.state_path, json.dumps(state, indent=2) + "\n")
            return state
        except BaseException as error:
            log(f"start-up failed ({error.__class__.__name__}); stopping what was started")
            begin = time.monotonic()
            for stop in reversed(started):
                with contextlib.suppress(Exception):
                    stop()
            kill_processes(self._stragglers(instance_id, head, node_temp_dirs=[]))
            log(f"stopped in {time.monotonic() - begin:.1f} s")
            if isinstance(error, Exception) and not isinstance(error, LocalPlatformError):
                raise LocalPlatformError(f"segplatform local up failed: {error}") from error
            raise

    # ------------------------------------------------------------------------------ status
    def status(self) -> list[ServiceStatus] | None:
        """The state of each service, or None when the platform is not up."""
        state = self.read_state()
        return None if state is None else self._statuses(state)

    def _statuses(self, state: dict[str, Any]) -> list[ServiceStatus]:
        services = state["services"]
        s3 = services["s3"]
        s3_alive = _group_leader_alive(s3["pid"])
        s3_code = _http_status(s3["endpoint_url"] + "/")
        mlflow = services["mlflow"]
        mlflow_alive = _group_leader_alive(mlflow["pid"])
        mlflow_code = _http_status(mlflow["tracking_uri"] + "/health")
        head = RayHead.from_record(self.state_dir / "ray", services["ray_head"])
        head_alive = head.is_alive()
        head_healthy = head_alive and head.healthy()
        if head_healthy:
            head_detail = "job server answers with the token"
        elif head_alive:
            head_detail = "job server not ready"
        else:
            head_detail = head.exit_reason() or "not running"
        node_statuses = []
        if services.get("ray_nodes"):
            by_name = {node.name: node for node in self._node_statuses(state, head)}
            for record in services["ray_nodes"]:
                node = by_name[record["name"]]
                healthy = node.process_alive and node.state == "ALIVE"
                node_statuses.append(
                    ServiceStatus(
                        f"ray_node:{node.name}",
                        node.node_id or "-",
                        node.pid,
                        node.process_alive,
                        healthy,
                        f"{node.state} in the cluster, {node.cpus:g} CPU",
                    )
                )
        return [
            ServiceStatus(
                "s3",
                s3["endpoint_url"],
                s3["pid"],
                s3_alive,
                s3_alive and s3_code == 403,
                f"anonymous request -> HTTP {s3_code}" if s3_code else "no answer",
            ),
            ServiceStatus(
                "mlflow",
                mlflow["tracking_uri"],
                mlflow["pid"],
                mlflow_alive,
                mlflow_alive and mlflow_code == 200,
                f"/health -> HTTP {mlflow_code}" if mlflow_code else "no answer",
            ),
            ServiceStatus(
                "ray_head",
                head.dashboard_url,
                head.pid,
                head_alive,
                head_healthy,
                head_detail,
            ),
            *node_statuses,
        ]

    # ------------------------------------------------------------------------------ nodes
    def nodes(self) -> list[NodeStatus] | None:
        """The Ray nodes: the head, the worker nodes this platform started, and any other node
        that joined the cluster; None when the platform is not up."""
        state = self.read_state()
        if state is None:
            return None
        head = RayHead.from_record(self.state_dir / "ray", state["services"]["ray_head"])
        return self._node_statuses(state, head)

    def _node_statuses(self, state: dict[str, Any], head: RayHead) -> list[NodeStatus]:
        try:
            known = {node["node_id"]: node for node in head.cluster_nodes()}
        except RayHeadError:
            known = {}
        head_ids = [node_id for node_id, node in known.items() if node.get("is_head_node")]
        head_alive = head.is_alive()
        statuses = [
            _node_status(
                "head",
                head_ids[0] if head_ids else None,
                known.get(head_ids[0]) if head_ids else None,
                head.pid,
                head_alive,
                head_alive and bool(known),
            )
        ]
        recorded = set(head_ids)
        for record in state["services"].get("ray_nodes", []):
            node = RayWorkerNode.from_record(record)
            recorded.add(node.node_id)
            statuses.append(
                _node_status(
                    node.name,
                    node.node_id,
                    known.get(node.node_id),
                    node.pid,
                    node.is_alive(),
                    bool(known),
                    fallback_cpus=node.num_cpus,
                )
            )
        removed = {r["node_id"]: r["name"] for r in state.get("removed_nodes", []) if r["node_id"]}
        for node_id, node in known.items():
            # Removed nodes stay in the cluster's list (DEAD): shown while the cluster still
            # counts them ALIVE (a killed node, until its missed health checks are noticed).
            # Alive nodes that joined by other means are shown as "-".
            if node_id not in recorded and node.get("state") == "ALIVE":
                name = f"{removed[node_id]} (removed)" if node_id in removed else "-"
                statuses.append(_node_status(name, node_id, node, None, False, True))
        return statuses

    def add_node(
        self,
        *,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        timeout: float = 120.0,
        log: Callable[[str], None] = lambda message: None,
    ) -> dict[str, Any]:
        """Start one more Ray worker node joining the running head; returns its record.

        ``num_cpus`` defaults to the head's ``num_cpus`` (or all CPUs when the head has all).
        The name is ``node-K`` with K one more than any node this platform started before.
        """
        if num_cpus is not None and num_cpus < 1:
            raise ValueError(f"num_cpus must be at least 1, got {num_cpus}")
        with self._locked():
            state = self._running_state()
            head_record = state["services"]["ray_head"]
            head = RayHead.from_record(self.state_dir / "ray", head_record)
            if not head.is_alive():
                raise LocalPlatformError(
                    f"the Ray head of {self.state_dir} is not running; run `segplatform local down`"
                    " and `segplatform local up`"
                )
            index = int(state.get("nodes_started", len(state["services"]["ray_nodes"]))) + 1
            node = self._new_node(
                head_record,
                state["instance_id"],
                index,
                num_cpus if num_cpus is not None else head_record.get("num_cpus"),
                _client_service_env(state["env"]),
                num_gpus=num_gpus,
            )
            begin = time.monotonic()
            try:
                node.launch().wait_joined(head.cluster_nodes, timeout)
            except BaseException as error:
                node.stop(force=True)
                if isinstance(error, RayNodeError):
                    raise LocalPlatformError(str(error)) from error
                raise
            log(f"Ray node {node.name} ({node.node_id}) joined in {time.monotonic() - begin:.1f} s")
            record = node.to_record()
            state["services"]["ray_nodes"].append(record)
            state["nodes_started"] = index
            _write_private(self.state_path, json.dumps(state, indent=2) + "\n")
            return record

    def remove_node(
        self,
        node: str,
        *,
        force: bool = False,
        log: Callable[[str], None] = lambda message: None,
    ) -> dict[str, Any]:
        """Stop worker node ``node`` (its name, or its node id or a prefix of 6+ characters)
        and every process it started; returns its record. ``force`` kills it at once (a
        crash, as a lost machine) instead of letting the raylet drain and leave."""
        with self._locked():
            state = self._running_state()
            records = state["services"]["ray_nodes"]
            record = _find_node(records, node, state["services"]["ray_head"])
            begin = time.monotonic()
            RayWorkerNode.from_record(record).stop(force=force)
            how = "killed" if force else "stopped"
            log(f"Ray node {record['name']} {how} in {time.monotonic() - begin:.1f} s")
            state["services"]["ray_nodes"] = [r for r in records if r is not record]
            state.setdefault("removed_nodes", []).append(
                {"name": record["name"], "node_id": record.get("node_id")}
            )
            _write_private(self.state_path, json.dumps(state, indent=2) + "\n")
            return record

    def _running_state(self) -> dict[str, Any]:
        """``state.json`` (with a ``ray_nodes`` list); LocalPlatformError when not up."""
        state = self.read_state()
        if state is None:
            raise LocalPlatformError(
                f"the local platform is not up in {self.state_dir}; run `segplatform local up`"
            )
        state["services"].setdefault("ray_nodes", [])
        return state

    def _new_node(
        self,
        head_record: dict[str, Any],
        instance_id: str,
        index: int,
        num_cpus: int | None,
        env: dict[str, str],
        *,
        num_gpus: int | None = None,
    ) -> RayWorkerNode:
        name = f"node-{index}"
        return RayWorkerNode(
            self.state_dir / "ray" / "nodes" / name,
            name=name,
            gcs_address=head_record["gcs_address"],
            token_path=head_record["token_path"],
            instance_id=instance_id,
            host=head_record["host"],
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            env=env,
        )

    # ------------------------------------------------------------------------------ down
    def down(self, log: Callable[[str], None] = lambda message: None) -> bool:
        """Stop every service; returns False when the platform was not up."""
        with self._locked():
            state = self.read_state()
            if state is None:
                return False
            self._stop_all(state, log)
            return True

    def _stop_all(self, state: dict[str, Any], log: Callable[[str], None]) -> None:
        services = state["services"]
        head = RayHead.from_record(self.state_dir / "ray", services["ray_head"])
        workers = [RayWorkerNode.from_record(record) for record in services.get("ray_nodes", [])]
        if workers:
            begin = time.monotonic()
            with ThreadPoolExecutor(max_workers=len(workers)) as pool:
                list(pool.map(lambda node: node.stop(timeout=20.0), workers))
            log(f"Ray worker nodes ({len(workers)}) stopped in {time.monotonic() - begin:.1f} s")
        begin = time.monotonic()
        head.stop()
        log(f"Ray head stopped in {time.monotonic() - begin:.1f} s")
        begin = time.monotonic()
        MLflowServer.from_record(self.state_dir / "mlflow", services["mlflow"]).stop()
        log(f"MLflow stopped in {time.monotonic() - begin:.1f} s")
        begin = time.monotonic()
        if services["s3"].get("pid"):
            terminate_process_group(services["s3"]["pid"], timeout=15.0)
        log(f"S3 stopped in {time.monotonic() - begin:.1f} s")
        begin = time.monotonic()
        kill_processes(
            self._stragglers(
                state["instance_id"],
                head,
                services["s3"]["data_dir"],
                [str(node.temp_dir) for node in workers if node.temp_dir is not None],
            )
        )
        ports = _state_ports(state)
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline and any(port_is_open("127.0.0.1", p) for p in ports):
            time.sleep(0.2)
        still_open = [port for port in ports if port_is_open("127.0.0.1", port)]
        log(f"stragglers and ports checked in {time.monotonic() - begin:.1f} s")
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.env_path.unlink()
        if still_open:
            raise LocalPlatformError(
                f"services stopped but ports {still_open} are still open on 127.0.0.1"
            )

    def _stragglers(
        self,
        instance_id: str,
        head: RayHead | None,
        s3_data_dir: str | None = None,
        node_temp_dirs: list[str] | None = None,
    ) -> list[psutil.Process]:
        """Processes of this instance still running, never this process or its ancestors."""
        paths = [
            f"sqlite:///{self.state_dir / 'mlflow' / 'mlflow.db'}",
            f"-dir={s3_data_dir or self.state_dir / 's3' / 'data'}",
            *(f"{temp_dir}/session_" for temp_dir in node_temp_dirs or []),
        ]
        if head is not None and head.temp_dir is not None:
            paths.append(f"{head.temp_dir}/session_")
        return processes_marked(f"{instance_id}/", tuple(paths))


def _state_ports(state: dict[str, Any]) -> list[int]:
    services = state["services"]
    ports = [services["mlflow"]["port"], *services["ray_head"]["ports"].values()]
    ports += list(services["s3"]["ports"].values())
    for record in services.get("ray_nodes", []):
        ports += list(record["ports"].values())
    return [int(port) for port in ports]


def default_cpus_per_node(nodes: int) -> int:
    """Logical CPUs per node when ``--num-cpus`` is not given: the CPU count split over
    ``nodes``, at least 1 (logical CPUs may exceed the physical ones)."""
    return max(1, (os.cpu_count() or 1) // nodes)


def _client_service_env(env: dict[str, str]) -> dict[str, str]:
    """The service settings (MLflow, S3) among the client variables of ``state["env"]``."""
    return {
        key: value
        for key, value in env.items()
        if not key.startswith("RAY_") and key != HOME_ENV_VAR
    }


def _find_node(
    records: list[dict[str, Any]], wanted: str, head_record: dict[str, Any]
) -> dict[str, Any]:
    """The record of worker node ``wanted`` (name, node id, or an id prefix of 6+ characters)."""
    if wanted == "head":
        raise LocalPlatformError(
            "the head node cannot be removed (it holds the GCS and the job server); "
            "use `segplatform local down`"
        )
    matches = [record for record in records if record["name"] == wanted]
    if not matches and len(wanted) >= 6:
        matches = [r for r in records if (r.get("node_id") or "").startswith(wanted.lower())]
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(f"{r['name']} ({(r.get('node_id') or '?')[:12]})" for r in records)
    if len(matches) > 1:
        raise LocalPlatformError(f"node {wanted!r} is ambiguous: it matches {len(matches)} nodes")
    raise LocalPlatformError(
        f"no worker node {wanted!r} in this platform; worker nodes: {names or 'none'} "
        f"(head: {head_record.get('gcs_address')}, not removable)"
    )


def _node_status(
    name: str,
    node_id: str | None,
    cluster_entry: dict[str, Any] | None,
    pid: int | None,
    process_alive: bool,
    cluster_answered: bool,
    *,
    fallback_cpus: float | None = None,
) -> NodeStatus:
    resources = (cluster_entry or {}).get("resources_total") or {}
    if cluster_entry is not None:
        node_state = str(cluster_entry.get("state", "UNKNOWN"))
    else:
        node_state = "NOT JOINED" if cluster_answered else "UNKNOWN"
    return NodeStatus(
        name=name,
        node_id=node_id,
        state=node_state,
        is_head=name == "head",
        cpus=float(resources.get("CPU", fallback_cpus or 0.0)),
        gpus=float(resources.get("GPU", 0.0)),
        pid=pid,
        process_alive=process_alive,
        detail=str((cluster_entry or {}).get("state_message") or ""),
        object_store_mb=float(resources.get("object_store_memory", 0.0)) / 2**20,
    )


def _group_leader_alive(pid: int | None) -> bool:
    if not pid:
        return False
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    return False


def _http_status(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of ``GET url``, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def print_lines(message: str) -> None:
    """Progress output of ``up``/``down`` (stderr, so stdout stays eval-able)."""
    print(message, file=sys.stderr, flush=True)
