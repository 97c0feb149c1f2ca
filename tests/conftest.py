"""Fixtures shared by all tests: a real S3 server and small synthetic datasets.

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

S3_BUCKET = "test"


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
