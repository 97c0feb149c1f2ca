"""Every architecture (tiny config) overfits a few real images: proof that gradients and heads are
wired right.

Data: four training slices of the built-in ``mni152-tissue`` dataset (MNI152 T1 template with
grey/white/other-brain labels; two axial and two coronal slices), resized to 64×64 (bilinear
images, nearest masks) and repeated to 3 channels. Each model trains on that one batch of four
with Adam for at most ``MAX_STEPS`` steps; every ``EVAL_EVERY`` steps its training mIoU is measured
in eval mode with ``segplatform.metrics.ConfusionMatrix``. The test passes once the mIoU beats
both the untrained model and the majority-class baseline by ``MARGIN``.

Semantic models train with cross-entropy (ignore index 255) over ``model.loss_weights()``;
outputs below the input resolution (ICNet's cascade) are compared with nearest-downsampled labels.
``mask_rcnn`` trains on its own loss dict with targets from ``segplatform.detection`` (connected
components per class) and is scored through ``detections_to_semantic``.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from architectures import ARCHITECTURES, build_from_config, config_class
from architectures.mask_rcnn import detections_to_semantic
from segplatform.detection import targets_from_masks
from segplatform.metrics import ConfusionMatrix

SIZE = 64  # training images are SIZE × SIZE
MAX_STEPS = {"mask_rcnn": 120}  # step bound per architecture
DEFAULT_MAX_STEPS = 100
EVAL_EVERY = 10  # steps between mIoU measurements
LEARNING_RATE = {"mask_rcnn": 1e-3}  # Adam learning rate per architecture
DEFAULT_LEARNING_RATE = 3e-3
MARGIN = 0.15  # required mIoU gain over max(untrained model, majority-class baseline)
MIN_INSTANCE_AREA = 8  # mask_rcnn: connected components smaller than this are not instances


@dataclass(frozen=True)
class Batch:
    """The overfitting batch."""

    images: Tensor  # (4, 3, SIZE, SIZE) float in [0, 1]
    masks: Tensor  # (4, SIZE, SIZE) int64 labels
    num_classes: int
    ignore_index: int


def _resize(sample_image: bytes, sample_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = Image.open(io.BytesIO(sample_image)).convert("L")
    image = image.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    mask = Image.fromarray(sample_mask.astype(np.uint8)).resize(
        (SIZE, SIZE), Image.Resampling.NEAREST
    )
    return np.asarray(image, dtype=np.float32) / 255.0, np.asarray(mask, dtype=np.int64)


@pytest.fixture(scope="module")
def batch() -> Batch:
    from segplatform.data.sources import BUILTIN_SOURCES

    info, rows = BUILTIN_SOURCES["mni152-tissue"]()
    by_orientation: dict[str, list] = {"axial": [], "coronal": []}
    for split, sample in rows:
        orientation = sample.id.split("-")[0]
        if split == "train" and orientation in by_orientation:
            by_orientation[orientation].append(sample)
    images, masks = [], []
    for samples in by_orientation.values():
        samples.sort(key=lambda s: s.id)
        for fraction in (1 / 3, 2 / 3):  # a third and two thirds through the train slices
            sample = samples[int(len(samples) * fraction)]
            image, mask = _resize(sample.image, sample.mask)
            images.append(image)
            masks.append(mask)
    images_t = torch.from_numpy(np.stack(images))[:, None].repeat(1, 3, 1, 1)  # (4, 3, H, W)
    masks_t = torch.from_numpy(np.stack(masks))  # (4, H, W)
    assert set(masks_t.unique().tolist()) == set(range(len(info.classes)))
    return Batch(images_t, masks_t, len(info.classes), info.ignore_index)


@pytest.fixture
def two_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _semantic_loss(model: nn.Module, outputs: dict[str, Tensor], batch: Batch) -> Tensor:
    loss = torch.zeros(())
    for key, weight in model.loss_weights().items():
        logits = outputs[key]  # (N, K, h, w)
        target = batch.masks
        if logits.shape[-2:] != target.shape[-2:]:
            target = F.interpolate(target[:, None].float(), size=logits.shape[-2:], mode="nearest")
            target = target[:, 0].long()  # (N, h, w)
        loss = loss + weight * F.cross_entropy(logits, target, ignore_index=batch.ignore_index)
    return loss


class _Trainer:
    """One architecture on the batch: a training step and the training mIoU."""

    def __init__(self, name: str, batch: Batch) -> None:
        self.name, self.batch = name, batch
        config = config_class(name).tiny(num_classes=batch.num_classes)
        self.model = build_from_config(name, config)
        self.instance = getattr(self.model, "task", "semantic") == "instance"
        if self.instance:
            self.inputs: Tensor | list[Tensor] = list(batch.images)  # [0, 1]: the model normalizes
            self.targets = [
                targets_from_masks(
                    mask.numpy(), ignore_index=batch.ignore_index, min_area=MIN_INSTANCE_AREA
                )
                for mask in batch.masks
            ]
        else:
            mean, std = batch.images.mean(), batch.images.std()
            self.inputs = (batch.images - mean) / std  # (N, 3, H, W) standardized
        params = [p for p in self.model.parameters() if p.requires_grad]
        lr = LEARNING_RATE.get(name, DEFAULT_LEARNING_RATE)
        self.optimizer = torch.optim.Adam(params, lr=lr)

    def step(self) -> float:
        self.model.train()
        if self.instance:
            losses = self.model(self.inputs, self.targets)
            weights = self.model.loss_weights()
            loss = sum(weights[k] * v for k, v in losses.items())
        else:
            loss = _semantic_loss(self.model, self.model(self.inputs), self.batch)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def miou(self) -> float:
        self.model.eval()
        if self.instance:
            detections = self.model(self.inputs)
            pred = torch.stack(
                [detections_to_semantic(d, (SIZE, SIZE)) for d in detections]
            )  # (N, H, W)
        else:
            pred = self.model(self.inputs)["out"]  # (N, K, H, W)
        matrix = ConfusionMatrix(self.batch.num_classes, ignore_index=self.batch.ignore_index)
        matrix.update(pred, self.batch.masks)
        return float(matrix.compute()["miou"])


def _majority_baseline(batch: Batch) -> float:
    labels = batch.masks[batch.masks != batch.ignore_index]
    majority = int(torch.bincount(labels).argmax())
    matrix = ConfusionMatrix(batch.num_classes, ignore_index=batch.ignore_index)
    matrix.update(torch.full_like(batch.masks, majority), batch.masks)
    return float(matrix.compute()["miou"])


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_tiny_model_overfits_real_slices(name: str, batch: Batch, two_threads: None) -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    start, start_cpu = time.perf_counter(), time.process_time()
    trainer = _Trainer(name, batch)
    initial = trainer.miou()
    baseline = _majority_baseline(batch)
    target = max(initial, baseline) + MARGIN
    max_steps = MAX_STEPS.get(name, DEFAULT_MAX_STEPS)
    history = [round(initial, 3)]
    steps, loss = 0, float("nan")
    while steps < max_steps:
        for _ in range(EVAL_EVERY):
            loss = trainer.step()
        steps += EVAL_EVERY
        assert np.isfinite(loss), f"{name}: loss became {loss} at step {steps}"
        history.append(round(trainer.miou(), 3))
        if history[-1] >= target:
            break
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    print(
        f"overfit {name}: mIoU {initial:.3f} -> {history[-1]:.3f} (baseline {baseline:.3f}, "
        f"target {target:.3f}) in {steps} steps, {seconds:.1f} s ({cpu_seconds:.1f} s CPU); "
        f"history {history}"
    )
    assert history[-1] >= target, (
        f"{name}: training mIoU {history[-1]:.3f} after {steps} steps does not reach "
        f"{target:.3f} (untrained {initial:.3f}, majority baseline {baseline:.3f}); "
        f"history {history}"
    )
