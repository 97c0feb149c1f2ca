"""The deployment files: Ray cluster launcher config, KubeRay RayJob, Dockerfile."""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((DEPLOY / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def rayjob():
    return yaml.safe_load((DEPLOY / "rayjob-refinenet.yaml").read_text())


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_cluster_config_passes_rays_schema(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    # prepare_config fills the provider's defaults, as `ray up` does, before the schema check.
    validate_config(prepare_config(copy.deepcopy(cluster)))
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["resources"] = "one GPU"
    with pytest.raises(Exception, match="resources"):
        validate_config(prepare_config(broken))


def test_cluster_has_autoscaling_gpu_workers_and_token_auth(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = [
        node
        for name, node in cluster["available_node_types"].items()
        if name != cluster["head_node_type"]
    ]
    assert any(w["resources"].get("GPU", 0) >= 1 and w["min_workers"] == 0 for w in workers)
    assert all(
        "RAY_AUTH_MODE=token" in " ".join(cluster[k])
        for k in ("head_start_ray_commands", "worker_start_ray_commands")
    )


def test_rayjob_manifest_runs_the_refinenet_job_on_gpus(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/train_refinenet.py"]
    assert (ROOT / argv[1]).is_file()
    assert argv[argv.index("--data") + 1].startswith("s3://")
    assert argv[argv.index("--storage") + 1].startswith("s3://")
    cluster_spec = spec["rayClusterSpec"]
    assert cluster_spec["rayVersion"] == ray.__version__
    assert cluster_spec["authOptions"]["mode"] == "token"
    for group in cluster_spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in group["template"]["spec"]["containers"]:
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_all_deploy_files_use_the_same_image(cluster, rayjob):
    images = {cluster["docker"]["image"]}
    groups = [rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]]
    groups += rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    for group in groups:
        images |= {c["image"] for c in group["template"]["spec"]["containers"]}
    assert len(images) == 1, images
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert images.pop().endswith(f"segplatform:{version}")


def test_dockerfile_copies_what_exists_and_installs_known_extras():
    instructions = _dockerfile_instructions()
    base = next(arg for op, arg in instructions if op == "FROM")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "python:3.11" in base and project["requires-python"] == ">=3.11"
    for op, arg in instructions:
        if op == "COPY":
            *sources, _ = arg.split()
            for source in sources:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    installs = [arg for op, arg in instructions if op == "RUN" and "pip install" in arg]
    extras = set(re.findall(r"\.\[([^\]]+)\]", " ".join(installs))[0].split(","))
    assert extras <= set(project["optional-dependencies"])
    assert any(op == "USER" and arg != "root" for op, arg in instructions)
