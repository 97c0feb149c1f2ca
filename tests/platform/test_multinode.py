"""Integration tests of a multi-node local platform: ``segplatform local up --nodes 2``,
``local status``, ``local node add|remove`` and ``local down`` with real raylets on 127.0.0.1.

The tests run in file order on the session's two-node platform (``two_node_platform``, 1 logical
CPU per node), after the other modules that use it (``ends_platform``): by then its worker node
may have been replaced (``tests/train/test_multinode_train.py`` loses node-1 and adds the next),
so the tests read the node's name from the platform's state.
``test_down_stops_every_node_and_leaves_nothing`` stops the platform.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.platform_support import (
    RunningPlatform,
    alive_nodes,
    clean_env,
    leftover_processes,
    open_ports,
    run_cli,
    run_venv,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.ends_platform]

# A job that runs one task in each bundle of a STRICT_SPREAD placement group (one per node) and
# prints where each ran and which platform settings its process inherited.
SPREAD_JOB = """\
import json
import os

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

ray.init()
group = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
ray.get(group.ready(), timeout=120)


@ray.remote(num_cpus=1)
def where():
    keys = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_URI")
    return {"node_id": ray.get_runtime_context().get_node_id(), **{k: os.environ[k] for k in keys}}


bundles = [PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i) for i in (0, 1)]
placed = ray.get([where.options(scheduling_strategy=bundle).remote() for bundle in bundles])
print("PLACEMENT", json.dumps(placed))
"""


@pytest.fixture(scope="module")
def cluster(two_node_platform: RunningPlatform) -> RunningPlatform:
    return two_node_platform


def worker_node(cluster: RunningPlatform) -> tuple[str, int]:
    """The name of the platform's one worker node and its number (``node-N``)."""
    (record,) = cluster.read_state()["services"]["ray_nodes"]
    name = record["name"]
    assert re.fullmatch(r"node-\d+", name), name
    return name, int(name.split("-")[1])


def node_processes(instance_id: str, name: str | None = None) -> list[str]:
    """Processes carrying the platform's instance marker (of worker node ``name`` if given)."""
    marker_prefix = f"{instance_id}/node/{name}" if name else f"{instance_id}/"
    return leftover_processes(marker_prefix=marker_prefix)


def test_nodes_must_be_at_least_one(tmp_path: Path) -> None:
    result = run_cli(
        ["local", "up", "--state-dir", str(tmp_path / "s"), "--nodes", "0"], timeout=60
    )
    assert result.returncode == 2
    assert "--nodes" in result.stderr and "at least 1" in result.stderr
    assert not (tmp_path / "s").exists()


def test_up_starts_two_nodes_and_status_lists_them(cluster: RunningPlatform) -> None:
    assert [record["name"] for record in cluster.state["services"]["ray_nodes"]] == ["node-1"]
    assert "node-1" in cluster.up_output.stdout
    records = cluster.read_state()["services"]["ray_nodes"]
    name, _ = worker_node(cluster)
    assert re.fullmatch(r"[0-9a-f]{56}", records[0]["node_id"])
    report = cluster.status_report()
    assert report["healthy"] is True, report
    nodes = alive_nodes(report)
    assert set(nodes) == {"head", name}, report["nodes"]
    assert nodes["head"]["is_head"] and not nodes[name]["is_head"]
    assert nodes[name]["node_id"] == records[0]["node_id"]
    assert nodes["head"]["node_id"] != nodes[name]["node_id"]
    assert [nodes[n]["cpus"] for n in ("head", name)] == [1.0, 1.0]
    text = run_cli(["local", "status", "--state-dir", str(cluster.state_dir)])
    assert re.search(rf"{name}\s+ALIVE\s+" + records[0]["node_id"], text.stdout), text.stdout
    again = run_cli(["local", "up", "--state-dir", str(cluster.state_dir), "--nodes", "3"])
    assert again.returncode == 0 and "already up" in again.stdout
    assert "2 Ray node(s), not 3" in again.stdout


def test_spread_job_runs_on_both_nodes_with_platform_settings(
    cluster: RunningPlatform, tmp_path: Path
) -> None:
    (tmp_path / "job.py").write_text(SPREAD_JOB)
    exports = cluster.read_state()["env"]
    env = clean_env(cluster.home, {k: v for k, v in exports.items() if k != "SEGPLATFORM_HOME"})
    command = ["job", "submit", "--working-dir", str(tmp_path), "--", "python", "job.py"]
    result = run_venv(["ray", *command], env=env, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in output, output
    placed = json.loads(re.search(r"^PLACEMENT (.*)$", output, re.MULTILINE).group(1))
    nodes = alive_nodes(cluster.status_report())
    name, _ = worker_node(cluster)
    assert {p["node_id"] for p in placed} == {nodes["head"]["node_id"], nodes[name]["node_id"]}
    for where in placed:  # workers on the extra node reach the same S3 and MLflow
        assert where["AWS_ENDPOINT_URL"] == exports["AWS_ENDPOINT_URL"]
        assert where["AWS_ACCESS_KEY_ID"] == exports["AWS_ACCESS_KEY_ID"]
        assert where["MLFLOW_TRACKING_URI"] == exports["MLFLOW_TRACKING_URI"]


def test_node_remove_then_add(cluster: RunningPlatform) -> None:
    state_dir = str(cluster.state_dir)
    instance_id = cluster.state["instance_id"]
    old_name, number = worker_node(cluster)
    old_id = cluster.read_state()["services"]["ray_nodes"][0]["node_id"]
    assert node_processes(instance_id, old_name)
    # Orderly removal: the raylet drains and the cluster marks the node DEAD at once.
    removed = run_cli(["local", "node", "remove", old_name, "--state-dir", state_dir])
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert node_processes(instance_id, old_name) == []
    assert cluster.read_state()["services"]["ray_nodes"] == []
    wait_for(
        lambda: set(alive_nodes(cluster.status_report())) == {"head"},
        30,
        "the removed node is still ALIVE in the cluster",
    )
    # A new node joins with a new name and node id.
    added = run_cli(
        ["local", "node", "add", "--state-dir", state_dir, "--timeout", "300"], timeout=320
    )
    assert added.returncode == 0, added.stdout + added.stderr
    name, node_id = added.stdout.split()
    assert name == f"node-{number + 1}" and node_id != old_id
    nodes = alive_nodes(cluster.status_report())
    assert set(nodes) == {"head", name} and nodes[name]["node_id"] == node_id
    assert nodes[name]["cpus"] == 1.0  # the head's --num-cpus
    # A crash (--force): every process of the node is gone at once; the cluster notices later.
    killed = run_cli(["local", "node", "remove", node_id[:10], "--force", "--state-dir", state_dir])
    assert killed.returncode == 0, killed.stdout + killed.stderr
    assert name in killed.stdout
    assert node_processes(instance_id, name) == []
    again = run_cli(
        ["local", "node", "add", "--state-dir", state_dir, "--timeout", "300"], timeout=320
    )
    assert again.returncode == 0 and again.stdout.startswith(f"node-{number + 2} "), again.stderr


def test_head_and_unknown_nodes_cannot_be_removed(cluster: RunningPlatform) -> None:
    state_dir = str(cluster.state_dir)
    head = run_cli(["local", "node", "remove", "head", "--state-dir", state_dir])
    assert head.returncode == 1 and "head node cannot be removed" in head.stderr
    name, _ = worker_node(cluster)
    unknown = run_cli(["local", "node", "remove", "node-1", "--state-dir", state_dir])
    assert unknown.returncode == 1
    assert "no worker node 'node-1'" in unknown.stderr and name in unknown.stderr


def test_down_stops_every_node_and_leaves_nothing(cluster: RunningPlatform) -> None:
    state = cluster.read_state()
    instance_id = state["instance_id"]
    records = state["services"]["ray_nodes"]
    name, _ = worker_node(cluster)
    ports = {int(port) for record in records for port in record["ports"].values()}
    ports |= {int(port) for port in state["services"]["ray_head"]["ports"].values()}
    temp_dirs = [Path(record["temp_dir"]) for record in records]
    assert node_processes(instance_id, name)
    result = run_cli(["local", "down", "--state-dir", str(cluster.state_dir)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "worker nodes (1) stopped" in result.stderr
    assert node_processes(instance_id) == []
    assert open_ports(ports) == []
    assert not any(
        path.exists() and not path.is_relative_to(cluster.state_dir) for path in temp_dirs
    )
    status = run_cli(["local", "status", "--state-dir", str(cluster.state_dir)])
    assert status.returncode == 3 and "not up" in status.stdout
