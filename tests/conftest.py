"""Fixtures shared by all tests: the session's Ray clusters, a real S3 server and small synthetic
datasets.

- Ray clusters (``tests.platform_support.RayClusters``), at most one running at a time:
  ``ray_cluster`` (the in-process ``ray.init(address="local", num_cpus=4)``),
  ``single_node_platform`` and ``two_node_platform`` (``segplatform local up``, shared by every
  module that needs one), ``no_ray_cluster`` (none: for a test whose code starts Ray itself or
  must show that it never started it). The tests run grouped by the cluster they use (no
  cluster first, then the in-process cluster, the single-node platform, the two-node platform;
  within a group, modules marked ``ends_platform`` last, in file order), so each cluster starts
  once.
- ``s3_server``: a SeaweedFS S3 server on a free loopback port for the whole session, with random
  credentials that it enforces and one bucket ``test``. Use ``s3_server.storage_options()`` or
  ``s3_server.env()``; give each test its own prefix (``s3_prefix`` does).
- ``tiny_dataset``: a factory ``tiny_dataset(uri, **kwargs) -> DatasetInfo`` that writes a small
  synthetic dataset (random images, blocky masks) with ``DatasetWriter``.
"""

from __future__ import annotations

import io
import secrets
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from segplatform.data.format import DatasetInfo, DatasetWriter, Sample, default_palette
from segplatform.services.seaweed import SeaweedServer
from tests.platform_support import RayClusters, RunningPlatform

S3_BUCKET = "test"

# ---- Ray clusters -------------------------------------------------------------------------------

# Fixture -> the group of the tests that use it (the order in which groups run).
CLUSTER_GROUPS = {
    "no_ray_cluster": 0,
    "ray_cluster": 1,
    "single_node_platform": 2,
    "two_node_platform": 3,
}


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Group the tests by the Ray cluster they use (module docstring); stable within a group.
    A test that needs a cluster is ``slow`` whether or not its module says so."""

    def group(item: pytest.Item) -> tuple[int, int]:
        names = getattr(item, "fixturenames", ())
        cluster = max((CLUSTER_GROUPS[n] for n in names if n in CLUSTER_GROUPS), default=0)
        return cluster, int(item.get_closest_marker("ends_platform") is not None)

    for item in items:
        if group(item)[0] > 0 and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
    items.sort(key=group)


@pytest.fixture(scope="session")
def ray_clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayClusters]:
    clusters = RayClusters(tmp_path_factory)
    try:
        yield clusters
    finally:
        clusters.stop()


@pytest.fixture(scope="module")
def ray_cluster(ray_clusters: RayClusters) -> None:
    """The in-process Ray cluster: 4 logical CPUs on 2 cores (two 0.5-CPU Ray Train workers
    leave Ray Data and the decoding tasks room)."""
    ray_clusters.use("in-process")


@pytest.fixture(scope="module")
def single_node_platform(ray_clusters: RayClusters) -> RunningPlatform:
    """``segplatform local up --num-cpus 4``: Ray head (token auth), MLflow, S3 on 127.0.0.1."""
    platform = ray_clusters.use("single-node")
    assert platform is not None
    return platform


@pytest.fixture(scope="module")
def two_node_platform(ray_clusters: RayClusters) -> RunningPlatform:
    """``segplatform local up --nodes 2 --num-cpus 1``: a head and node-1, one CPU each."""
    platform = ray_clusters.use("two-node")
    assert platform is not None
    return platform


@pytest.fixture
def no_ray_cluster(ray_clusters: RayClusters) -> None:
    """No Ray cluster runs (and none is connected to this process)."""
    ray_clusters.use(None)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A SeaweedFS S3 server with enforced random credentials and the bucket ``test``."""
    root = tmp_path_factory.mktemp("seaweed")
    server = SeaweedServer(
        root,
        access_key="AK" + secrets.token_hex(8).upper(),
        secret_key=secrets.token_urlsafe(24),
    )
    server.start(timeout=60)
    try:
        server.create_bucket(S3_BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_prefix(s3_server: SeaweedServer) -> str:
    """A fresh ``s3://test/<unique>`` prefix for one test."""
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}"


def synthetic_sample(
    index: int,
    *,
    size: tuple[int, int] = (24, 32),
    num_classes: int = 3,
    ignore_index: int = 255,
    mode: str = "RGB",
    seed: int = 0,
    with_instances: bool = False,
) -> Sample:
    """A deterministic sample: random image, blocky label map with a few ignored pixels."""
    rng = np.random.default_rng(seed * 10_007 + index)
    height, width = size
    channels = (height, width, 3) if mode == "RGB" else (height, width)
    pixels = rng.integers(0, 256, channels, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    blocks = rng.integers(0, num_classes, (height // 8 + 1, width // 8 + 1))
    mask = np.kron(blocks, np.ones((8, 8), dtype=np.int64))[:height, :width]
    mask = mask.astype(np.uint8 if max(num_classes, ignore_index) < 256 else np.uint16)
    mask[0, :3] = ignore_index
    instances = None
    if with_instances:
        instances = (np.kron(np.arange(blocks.size).reshape(blocks.shape), np.ones((8, 8))))[
            :height, :width
        ].astype(np.uint16)
    return Sample(
        id=f"sample-{index:04d}",
        image=buffer.getvalue(),
        mask=mask,
        instances=instances,
        source=f"synthetic #{index}",
    )


@pytest.fixture
def tiny_dataset() -> Callable[..., DatasetInfo]:
    """Factory writing a small synthetic dataset to a URI; returns its manifest."""

    def write(
        uri: str | Path,
        *,
        splits: dict[str, int] | None = None,
        num_classes: int = 3,
        size: tuple[int, int] = (24, 32),
        storage_options: dict[str, Any] | None = None,
        overwrite: bool = False,
        with_instances: bool = False,
        max_shard_bytes: int = 64 << 20,
        name: str = "tiny",
    ) -> DatasetInfo:
        splits = splits or {"train": 6, "val": 2}
        info = DatasetInfo(
            name,
            tuple(f"class{i}" for i in range(num_classes)),
            default_palette(num_classes),
        )
        index = 0
        with DatasetWriter(
            str(uri),
            info,
            overwrite=overwrite,
            max_shard_bytes=max_shard_bytes,
            storage_options=storage_options,
        ) as writer:
            for split, rows in splits.items():
                for _ in range(rows):
                    writer.add(
                        split,
                        synthetic_sample(
                            index, size=size, num_classes=num_classes, with_instances=with_instances
                        ),
                    )
                    index += 1
            return writer.close()

    return write


@pytest.fixture
def make_sample() -> Callable[..., Sample]:
    """The deterministic sample generator ``tiny_dataset`` uses (same index -> same sample)."""
    return synthetic_sample
