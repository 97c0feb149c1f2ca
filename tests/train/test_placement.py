"""The placement checks made before a run starts (``segplatform.train.placement``), on node lists
in the shape ``ray.nodes()`` returns; and the placement record of the workers."""

from __future__ import annotations

from typing import Any

import pytest

from segplatform.train.placement import (
    ClusterFitError,
    SharedStorageError,
    check_cluster_fits,
    check_shared_storage,
    node_capacity,
    placement_summary,
    placement_table,
    preflight,
)


def node(node_id: str, alive: bool = True, **resources: float) -> dict[str, Any]:
    return {"NodeID": node_id * 56, "Alive": alive, "Resources": resources}


TWO_NODES = [node("a", CPU=1), node("b", CPU=1)]


def test_node_capacity_uses_every_requested_resource() -> None:
    assert node_capacity({"CPU": 0.5}, node("a", CPU=2)) == 4
    assert node_capacity({"CPU": 0.1}, node("a", CPU=0.3)) == 3  # no float round-down
    assert node_capacity({"CPU": 1, "GPU": 1}, node("a", CPU=8, GPU=2)) == 2
    assert node_capacity({"CPU": 1, "GPU": 1}, node("a", CPU=8)) == 0


@pytest.mark.parametrize("strategy", ["PACK", "SPREAD", "STRICT_SPREAD"])
def test_two_half_cpu_workers_fit_two_one_cpu_nodes(strategy: str) -> None:
    check_cluster_fits({"CPU": 0.5}, 2, strategy, TWO_NODES)


def test_strict_spread_over_more_workers_than_nodes_is_refused() -> None:
    nodes = [*TWO_NODES, node("c", alive=False, CPU=1)]  # a dead node does not count
    with pytest.raises(ClusterFitError) as error:
        check_cluster_fits({"CPU": 0.25}, 3, "STRICT_SPREAD", nodes)
    message = str(error.value)
    assert "STRICT_SPREAD" in message and "only 2 of the 2 alive node(s)" in message
    assert "aaaaaaaaaaaa" in message and "bbbbbbbbbbbb" in message  # names the nodes
    # SPREAD puts several workers per node when it must.
    check_cluster_fits({"CPU": 0.25}, 3, "SPREAD", nodes)


def test_strict_pack_needs_one_big_enough_node() -> None:
    with pytest.raises(ClusterFitError, match="STRICT_PACK puts every worker on one node"):
        check_cluster_fits({"CPU": 0.5}, 3, "STRICT_PACK", TWO_NODES)
    check_cluster_fits({"CPU": 0.5}, 3, "STRICT_PACK", [node("a", CPU=1), node("b", CPU=2)])


def test_a_worker_larger_than_every_node_is_refused() -> None:
    with pytest.raises(ClusterFitError, match="no node has GPU enough for one worker"):
        check_cluster_fits({"CPU": 1, "GPU": 1}, 1, "PACK", [node("a", CPU=8)])
    with pytest.raises(ClusterFitError, match="no node has CPU enough"):
        check_cluster_fits({"CPU": 4}, 1, "PACK", TWO_NODES)


def test_pack_over_the_whole_cluster_capacity_is_refused() -> None:
    with pytest.raises(ClusterFitError, match="holds at most 4 such worker"):
        check_cluster_fits({"CPU": 0.5}, 5, "PACK", [node("a", CPU=1), node("b", CPU=1.4)])


def test_workers_taking_every_cpu_are_refused() -> None:
    # The known hang: the tasks that decode batches would get no CPU.
    with pytest.raises(ClusterFitError, match="would leave 0 of the cluster's 2 CPU"):
        check_cluster_fits({"CPU": 1}, 2, "STRICT_SPREAD", TWO_NODES)
    # Some CPU left, but less than one decoding task takes.
    with pytest.raises(ClusterFitError, match=r"leave 0\.25 .* \(0\.5 CPU each"):
        check_cluster_fits({"CPU": 0.875}, 2, "SPREAD", TWO_NODES, data_cpus=0.5)
    check_cluster_fits({"CPU": 0.75}, 2, "SPREAD", TWO_NODES, data_cpus=0.5)


def test_no_alive_node() -> None:
    with pytest.raises(ClusterFitError, match="no alive node"):
        check_cluster_fits({"CPU": 1}, 1, "PACK", [node("a", alive=False, CPU=4)])


def test_local_storage_on_a_multi_node_cluster_is_refused() -> None:
    locations = {"storage_path": "/home/me/runs", "data": "s3://bucket/data"}
    with pytest.raises(SharedStorageError) as error:
        check_shared_storage(locations, 2)
    message = str(error.value)
    assert message.startswith("TrainConfig.storage_path: the cluster has 2 nodes")
    assert "'/home/me/runs'" in message and "shared storage such as s3://" in message
    with pytest.raises(SharedStorageError, match="data='file:///srv/data'"):
        check_shared_storage({"storage_path": "s3://b/runs", "data": "file:///srv/data"}, 2)


def test_local_storage_is_fine_on_one_node_on_s3_or_when_declared_shared() -> None:
    local = {"storage_path": "/runs", "data": "/data"}
    check_shared_storage(local, 1)
    check_shared_storage({"storage_path": "s3://b/runs", "data": "s3://b/data"}, 2)
    check_shared_storage(local, 2, shared_local_storage=True)


def test_preflight_runs_both_checks_and_describes_the_cluster() -> None:
    arguments = {"bundle": {"CPU": 0.5}, "num_workers": 2, "strategy": "STRICT_SPREAD"}
    line = preflight(**arguments, locations={"storage_path": "s3://b/r"}, nodes=TWO_NODES)
    assert line == "2 worker(s) of {CPU: 0.5} with STRICT_SPREAD on 2 alive node(s) (2 CPU, 0 GPU)"
    with pytest.raises(SharedStorageError):  # checked first: a local path on two nodes
        preflight(**{**arguments, "num_workers": 3}, locations={"data": "/d"}, nodes=TWO_NODES)
    with pytest.raises(ClusterFitError):
        preflight(**{**arguments, "num_workers": 3}, locations={}, nodes=TWO_NODES)
    # check_fit=False: the request is left to Ray (e.g. nodes that are about to join).
    preflight(**{**arguments, "num_workers": 3}, locations={}, nodes=TWO_NODES, check_fit=False)


def test_preflight_on_an_autoscaling_cluster() -> None:
    # One CPU head now; the autoscaler may start up to 4 GPU nodes: Ray Train checks the request
    # against the autoscaler's maximum, and local storage is refused (the cluster may grow).
    head_only = [node("h", CPU=4)]
    groups = [
        {"name": "head", "resources": {"CPU": 4.0}, "max_count": 1},
        {"name": "gpu", "resources": {"CPU": 8.0, "GPU": 1.0}, "max_count": 4},
    ]
    arguments = {"bundle": {"CPU": 4, "GPU": 1}, "num_workers": 4, "strategy": "SPREAD"}
    line = preflight(
        **arguments, locations={"data": "s3://b/d"}, nodes=head_only, node_groups=groups
    )
    assert line.endswith("(4 CPU, 0 GPU, autoscaling up to 5 nodes)")
    with pytest.raises(SharedStorageError, match="the cluster has 5 nodes"):
        preflight(**arguments, locations={"data": "/d"}, nodes=head_only, node_groups=groups)


def test_placement_table_and_summary_in_rank_order() -> None:
    workers = [
        {"rank": 1, "local_rank": 0, "node_id": "b" * 56, "node_ip": "10.0.0.2", "pid": 12},
        {"rank": 0, "local_rank": 0, "node_id": "a" * 56, "node_ip": "10.0.0.1", "pid": 11},
    ]
    table = placement_table(workers)
    assert table["rank"] == [0, 1]
    assert table["node_id"] == ["a" * 56, "b" * 56]
    assert table["pid"] == [11, 12]
    assert placement_summary(workers) == (
        "2 workers on 2 nodes: rank 0 -> aaaaaaaaaaaa/0, rank 1 -> bbbbbbbbbbbb/0"
    )


def test_config_worker_bundle_and_validation() -> None:
    from segplatform.train.config import TrainConfig

    config = TrainConfig(data="s3://b/d", worker_resources={"memory": 2e9})
    assert config.worker_bundle() == {"CPU": 0.5, "memory": 2e9}
    gpu = TrainConfig(data="s3://b/d", use_gpu=True, cpus_per_worker=2)
    assert gpu.worker_bundle() == {"CPU": 2.0, "GPU": 1.0}
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"TrainConfig\.worker_resources: CPU and GPU come from"):
        TrainConfig(worker_resources={"CPU": 2})
    with pytest.raises(ValueError, match=r"TrainConfig\.worker_resources: must map"):
        TrainConfig(worker_resources={"memory": 0})
    with pytest.raises(ValueError, match=r"TrainConfig\.placement_strategy: must be one of"):
        TrainConfig(placement_strategy="ANYWHERE")


def test_job_command_line_placement_options() -> None:
    from segplatform.train.cli_args import build_parser, config_from_args

    parser = build_parser()
    args = parser.parse_args(
        [
            "--data",
            "s3://b/d",
            "--placement",
            "STRICT_SPREAD",
            "--worker-resources",
            '{"memory": 1e9}',
            "--no-check-cluster",
            "--shared-local-storage",
        ]
    )
    config = config_from_args(args, parser=parser)
    assert config.placement_strategy == "STRICT_SPREAD"
    assert config.worker_resources == {"memory": 1e9}
    assert config.check_cluster is False and config.shared_local_storage is True
    old_spelling = parser.parse_args(["--data", "d", "--placement-strategy", "SPREAD"])
    assert config_from_args(old_spelling).placement_strategy == "SPREAD"
    defaults = config_from_args(parser.parse_args(["--data", "d"]))
    assert (defaults.placement_strategy, defaults.check_cluster) == ("PACK", True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--placement", "EVERYWHERE"])
