"""Where a run's workers go, checked before anything starts, and how the placement is recorded.

Ray Train asks Ray for one placement-group bundle per worker (``worker_bundle``: CPUs, one GPU
with ``use_gpu``, extra resources) with the run's strategy:

- ``PACK`` (default): as few nodes as possible, spilling over when a node is full;
- ``SPREAD``: across nodes where possible, several workers per node otherwise;
- ``STRICT_SPREAD``: every worker on its own node (needs ``num_workers`` nodes);
- ``STRICT_PACK``: all workers on one node.

A request the cluster cannot hold is never refused by Ray: the placement group waits for ever.
``check_cluster_fits`` reads the nodes (``ray.nodes()``) and raises ``ClusterFitError`` at once,
naming the nodes, when the request cannot fit their *total* resources (a busy cluster is fine:
the run waits for running work to end). It also refuses a request whose workers would take every
CPU of the cluster: the tasks that decode their batches would then get none and the run would hang.
On an autoscaling cluster (nodes appear on demand) turn the check off (``check_cluster=False``).

``check_shared_storage`` refuses node-local paths for checkpoints and data when the cluster has
more than one alive node: workers on other nodes could not read the shards, a restarted worker
group on another node could not find the checkpoints, and a lost node would take them with it.
They must be on shared storage (``s3://``); a filesystem mounted on every node (NFS) is declared
with ``shared_local_storage=True``.

``placement_table`` / ``placement_summary`` describe the workers that ran (rank, local rank, node
id, node IP, pid), for the MLflow tag ``placement`` and the artifact ``placement/attempt<N>.json``
that rank 0 logs at the start of every attempt.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "ClusterFitError",
    "SharedStorageError",
    "alive_nodes",
    "autoscaling_node_groups",
    "check_cluster_fits",
    "check_shared_storage",
    "is_node_local",
    "node_capacity",
    "placement_summary",
    "placement_table",
    "preflight",
]


class ClusterFitError(ValueError):
    """The requested workers cannot be placed on the cluster's nodes."""


class SharedStorageError(ValueError):
    """A multi-node run was given node-local storage for its checkpoints or data."""


def alive_nodes(nodes: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The alive entries of ``ray.nodes()``."""
    return [node for node in nodes if node.get("Alive", node.get("alive", False))]


def _resources(node: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in (node.get("Resources") or {}).items()}


def _short(node: Mapping[str, Any]) -> str:
    return str(node.get("NodeID", "?"))[:12]


def node_capacity(bundle: Mapping[str, float], node: Mapping[str, Any]) -> int:
    """How many workers of ``bundle`` one node holds (by its total resources)."""
    resources = _resources(node)
    capacity = math.inf
    for name, amount in bundle.items():
        if amount <= 0:
            continue
        # A small tolerance: 0.1 × 3 must fit 0.3.
        capacity = min(capacity, math.floor(resources.get(name, 0.0) / amount + 1e-9))
    return 0 if capacity == math.inf else int(capacity)


def _describe(nodes: Sequence[Mapping[str, Any]], bundle: Mapping[str, float]) -> str:
    parts = []
    for node in nodes:
        resources = _resources(node)
        shown = ", ".join(f"{resources.get(name, 0.0):g} {name}" for name in bundle)
        parts.append(f"{_short(node)} ({shown})")
    return "; ".join(parts) or "none"


def _format_bundle(bundle: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{name}: {amount:g}" for name, amount in bundle.items()) + "}"


def check_cluster_fits(
    bundle: Mapping[str, float],
    num_workers: int,
    strategy: str,
    nodes: Sequence[Mapping[str, Any]],
    *,
    data_cpus: float = 0.0,
) -> None:
    """Raise ``ClusterFitError`` when ``num_workers`` workers of ``bundle`` cannot be placed
    with ``strategy`` on the alive ``nodes`` (``ray.nodes()`` entries), or would leave less CPU
    than one decoding task takes (``data_cpus``; some CPU in any case)."""
    alive = alive_nodes(nodes)
    request = f"{num_workers} worker(s) of {_format_bundle(bundle)} with {strategy}"
    where = f"alive nodes: {_describe(alive, bundle)}"
    if not alive:
        raise ClusterFitError(f"cannot place {request}: the cluster has no alive node")
    capacities = [node_capacity(bundle, node) for node in alive]
    if max(capacities) == 0:
        missing = [
            name
            for name, amount in bundle.items()
            if amount > 0 and all(_resources(node).get(name, 0.0) < amount for node in alive)
        ]
        raise ClusterFitError(
            f"cannot place {request}: no node has {', '.join(missing)} enough for one worker "
            f"({where}); lower the resources per worker (cpus_per_worker, use_gpu, "
            "worker_resources) or add bigger nodes"
        )
    fitting = sum(1 for capacity in capacities if capacity >= 1)
    if strategy == "STRICT_SPREAD" and fitting < num_workers:
        raise ClusterFitError(
            f"cannot place {request}: STRICT_SPREAD puts every worker on its own node, but only "
            f"{fitting} of the {len(alive)} alive node(s) can hold a worker ({where}); use fewer "
            "workers, add nodes, or use placement SPREAD or PACK"
        )
    if strategy == "STRICT_PACK" and max(capacities) < num_workers:
        raise ClusterFitError(
            f"cannot place {request}: STRICT_PACK puts every worker on one node, but the largest "
            f"node holds {max(capacities)} ({where}); use fewer workers or placement PACK"
        )
    if strategy in ("PACK", "SPREAD") and sum(capacities) < num_workers:
        raise ClusterFitError(
            f"cannot place {request}: the cluster holds at most {sum(capacities)} such "
            f"worker(s) ({where}); use fewer workers or smaller ones, or add nodes"
        )
    total_cpus = sum(_resources(node).get("CPU", 0.0) for node in alive)
    worker_cpus = num_workers * float(bundle.get("CPU", 0.0))
    left = total_cpus - worker_cpus
    if worker_cpus > 0 and (left <= 1e-9 or left < data_cpus):
        raise ClusterFitError(
            f"{request} would leave {max(left, 0):g} of the cluster's {total_cpus:g} CPU(s) for "
            f"the tasks that decode batches ({data_cpus:g} CPU each: the run would hang); lower "
            f"cpus_per_worker (e.g. {total_cpus / (num_workers + 1):.2g}), loader_task_cpus, or "
            f"add CPUs ({where})"
        )


def check_shared_storage(
    locations: Mapping[str, str | None],
    node_count: int,
    *,
    shared_local_storage: bool = False,
) -> None:
    """Raise ``SharedStorageError`` when the cluster has (or may grow to) more than one node
    and one of ``locations`` (field name -> URI) is a node-local path, unless
    ``shared_local_storage``."""
    count = node_count
    if count <= 1 or shared_local_storage:
        return
    local = {name: uri for name, uri in locations.items() if uri and is_node_local(uri)}
    if not local:
        return
    listed = ", ".join(f"{name}={uri!r}" for name, uri in local.items())
    raise SharedStorageError(
        f"TrainConfig.{next(iter(local))}: the cluster has {count} nodes, but {listed} "
        f"{'is a node-local path' if len(local) == 1 else 'are node-local paths'}. Checkpoints "
        "and dataset shards must be on shared storage such as s3://bucket/prefix: workers on "
        "other nodes cannot read a node's disk, and a lost node would take its checkpoints "
        "with it. (For a filesystem mounted on every node, e.g. NFS, set "
        "shared_local_storage / --shared-local-storage.)"
    )


def autoscaling_node_groups() -> list[dict[str, Any]] | None:
    """The node groups an autoscaler reported to the cluster (KubeRay, ``ray up`` with the
    autoscaler): ``[{"name", "resources", "max_count"}]`` (``max_count`` -1: unbounded), or None
    on a fixed cluster. Needs a connected Ray driver; never raises."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # a private Ray API: any failure means "not known"
        return None
    if config is None or not config.node_group_configs:
        return None
    return [
        {
            "name": group.name,
            "resources": {k: float(v) for k, v in group.resources.items()},
            "max_count": int(group.max_count),
        }
        for group in config.node_group_configs
    ]


def preflight(
    *,
    bundle: Mapping[str, float],
    num_workers: int,
    strategy: str,
    locations: Mapping[str, str | None],
    nodes: Sequence[Mapping[str, Any]],
    node_groups: Sequence[Mapping[str, Any]] | None = None,
    check_fit: bool = True,
    shared_local_storage: bool = False,
    data_cpus: float = 0.0,
) -> str:
    """Both checks before a run starts; returns one line about the cluster for the log.

    ``nodes``: ``ray.nodes()``. ``node_groups``: ``autoscaling_node_groups()``; on an
    autoscaling cluster the fit check is left to Ray Train (which compares the request with the
    autoscaler's maximum), and the storage guard counts the nodes it may start.
    """
    alive = alive_nodes(nodes)
    node_count = len(alive)
    if node_groups:
        possible = sum(g["max_count"] if g["max_count"] >= 0 else 2 for g in node_groups)
        node_count = max(node_count, possible)
    check_shared_storage(locations, node_count, shared_local_storage=shared_local_storage)
    if check_fit and not node_groups:
        check_cluster_fits(bundle, num_workers, strategy, nodes, data_cpus=data_cpus)
    cpus = sum(_resources(node).get("CPU", 0.0) for node in alive)
    gpus = sum(_resources(node).get("GPU", 0.0) for node in alive)
    scaling = f", autoscaling up to {node_count} nodes" if node_groups else ""
    return (
        f"{num_workers} worker(s) of {_format_bundle(bundle)} with {strategy} on "
        f"{len(alive)} alive node(s) ({cpus:g} CPU, {gpus:g} GPU{scaling})"
    )


def is_node_local(uri: str) -> bool:
    """Whether ``uri`` is a path on one node's disk (a plain path or ``file://``), not a
    storage service (``s3://``, ``gs://``, ...)."""
    text = str(uri)
    return "://" not in text or text.startswith("file://")


def placement_table(workers: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Column name -> values, one row per worker in rank order (for ``RunTracker.log_table``)."""
    rows = sorted(workers, key=lambda worker: int(worker["rank"]))
    columns = ("rank", "local_rank", "node_id", "node_ip", "pid")
    return {column: [row.get(column) for row in rows] for column in columns}


def placement_summary(workers: Sequence[Mapping[str, Any]]) -> str:
    """One line: ``2 workers on 2 nodes: rank 0 -> 3f2a9c01d4e5/0, rank 1 -> ...`` (node-id
    prefix / local rank)."""
    rows = sorted(workers, key=lambda worker: int(worker["rank"]))
    nodes = Counter(str(row["node_id"]) for row in rows)
    ranks = ", ".join(
        f"rank {row['rank']} -> {str(row['node_id'])[:12]}/{row['local_rank']}" for row in rows
    )
    workers = f"{len(rows)} worker{'s' if len(rows) != 1 else ''}"
    return f"{workers} on {len(nodes)} node{'s' if len(nodes) != 1 else ''}: {ranks}"
