"""Fixtures of the training tests: one local Ray cluster and small learnable datasets.

- ``ray_cluster`` (``tests/conftest.py``): the in-process Ray cluster the training tests share.
- ``shapes_dataset``: 48×48 RGB images with a red square (class 1) and a green bar (class 2) on
  dark noise (class 0), a few ignored pixels; 16 train / 4 val rows. Colour decides the class, so
  a tiny network learns it in a few iterations.
- ``instances_dataset``: the same with an instance map (one id per object), for Mask R-CNN.
- ``mni_dataset``: the built-in real dataset ``mni152-tissue`` (every 8th slice).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segplatform.data.format import DatasetInfo, DatasetWriter, Sample
from segplatform.train import TrainConfig

CLASSES = ("background", "square", "bar")
PALETTE = ((0, 0, 0), (220, 20, 60), (20, 200, 60))


def shapes_sample(index: int, size: int = 48, with_instances: bool = False) -> Sample:
    """A deterministic sample: noise background, a red square, a green vertical bar."""
    rng = np.random.default_rng(1000 + index)
    image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    instances = np.zeros((size, size), np.uint16)
    side = int(rng.integers(10, 18))
    top, left = (int(v) for v in rng.integers(0, size - side, 2))
    image[top : top + side, left : left + side] = (200, 30, 40)
    mask[top : top + side, left : left + side] = 1
    instances[top : top + side, left : left + side] = 1
    width = int(rng.integers(4, 8))
    column = int(rng.integers(0, size - width))
    image[:, column : column + width] = (30, 190, 50)
    mask[:, column : column + width] = 2
    instances[:, column : column + width] = 2
    mask[0, :4] = 255  # a few unlabelled pixels
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return Sample(
        id=f"shape-{index:03d}",
        image=buffer.getvalue(),
        mask=mask,
        instances=instances if with_instances else None,
        source=f"shapes #{index}",
    )


def write_shapes(
    uri: str,
    *,
    train: int = 16,
    val: int = 4,
    with_instances: bool = False,
    storage_options: dict | None = None,
    **layout: int,
) -> DatasetInfo:
    """The shapes set; ``layout``: DatasetWriter's ``max_shard_bytes``, ``row_group_bytes``."""
    info = DatasetInfo("shapes", CLASSES, PALETTE)
    with DatasetWriter(uri, info, storage_options=storage_options, **layout) as writer:
        for index in range(train + val):
            split = "train" if index < train else "val"
            writer.add(split, shapes_sample(index, with_instances=with_instances))
        return writer.close()


@pytest.fixture(scope="session")
def shapes_writer() -> Callable[..., DatasetInfo]:
    """``write_shapes(uri, *, train, val, with_instances, storage_options)``."""
    return write_shapes


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = str(tmp_path_factory.mktemp("data") / "shapes")
    write_shapes(uri)
    return uri


@pytest.fixture(scope="session")
def instances_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = str(tmp_path_factory.mktemp("data") / "shapes-instances")
    write_shapes(uri, train=8, val=2, with_instances=True)
    return uri


@pytest.fixture(scope="session")
def mni_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The built-in real MNI152 tissue set, every 8th slice (30 train / 12 val rows)."""
    from segplatform.data.sources import convert_builtin

    uri = str(tmp_path_factory.mktemp("data") / "mni152-tissue")
    convert_builtin("mni152-tissue", uri, show_progress=False, stride=8)
    return uri


# The small 2-worker U-Net the fault, outage and S3 tests train (keyword changes override).
TINY_UNET: dict[str, object] = {
    "arch": "unet",
    "tiny": True,
    "arch_params": {"padding": "same"},
    "crop_size": (32, 32),
    "batch_size": 2,
    "num_workers": 2,
    "overlay_samples": 0,
}


@pytest.fixture(scope="session")
def tiny_unet() -> Callable[..., TrainConfig]:
    """Factory: ``TrainConfig`` of ``TINY_UNET`` with the given fields."""
    return lambda **fields: TrainConfig(**{**TINY_UNET, **fields})


@pytest.fixture
def storage(tmp_path: Path) -> str:
    return str(tmp_path / "runs")


@pytest.fixture(autouse=True, scope="session")
def _tracking_buffer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep MLflow record buffers of the tests out of the home directory."""
    previous = os.environ.get("SEGPLATFORM_TRACKING_BUFFER")
    os.environ["SEGPLATFORM_TRACKING_BUFFER"] = str(tmp_path_factory.mktemp("tracking-buffer"))
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("SEGPLATFORM_TRACKING_BUFFER", None)
        else:
            os.environ["SEGPLATFORM_TRACKING_BUFFER"] = previous
