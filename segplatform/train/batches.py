"""Training and validation batches: one global order per epoch, rows read where they are
decoded, decoding and augmentation in Ray tasks.

**Rows.** The driver indexes a split from its shards' footers (``segplatform.data.shards``:
``open_split`` gives a ``SplitIndex``, no row data). A row's *index* is its position in the split
(shards in name order, rows in stored order). The process that decodes a row reads its row group
straight from the dataset URI through that process's bounded row-group cache (``RowReader``):
no row passes through the driver, and every node reads the source itself.

**Order.** Epoch ``e`` visits the rows in a permutation drawn from ``(seed, e)`` alone
(``epoch_order``). Iteration ``t`` of the epoch takes the next ``G = batch_size × grad_accum ×
workers`` indices; micro-batch ``m`` of worker ``r`` is the slice starting at ``t·G + (m·W +
r)·B`` (``micro_batch_indices``). So every row is seen once per epoch (the last ``rows mod G`` of
the permutation wait for a later epoch), a global batch depends only on ``(seed, epoch, t)`` and
the total batch, and a resumed run continues with exactly the batch that came next.

**Augmentation.** Each sample's random augmentation (scale, crop, flip, jitter) is drawn from a
generator seeded by ``(seed, epoch, index)``: the same whichever worker, task or process decodes
it, and after a resume.

**Decoding.** ``TrainBatches`` keeps ``loader_tasks`` Ray tasks of ``loader_task_cpus`` CPUs
each in flight (on the worker's node where it has room), so reading, PNG/JPEG decoding and
augmentation run outside the training process and its GIL; ``loader_tasks=0`` decodes inline.
Both call ``make_train_batch``: they give identical batches. A task decodes several consecutive
micro-batches (up to ``TASK_SAMPLES`` samples and ``TASK_PIXELS`` crop pixels, in whole
micro-batches; the first tasks of a stream take 1, 2, 4, ... so the first batch comes quickly):
submitting a task and storing its result cost about as much as decoding 8 small samples, and
that cost is paid per task. Ray reuses the decoding processes, and with them their row-group
caches. Nothing past the run's last step is decoded. Integer maps travel narrowed (masks as
uint8 where their values fit) and are widened to int64 in the consumer.

**Validation.** Worker ``r`` of ``W`` scores the rows whose index ``i`` has ``i mod W == r``
(``eval_indices``): every row exactly once, whatever the worker count.

Ray Data's ``streaming_split`` gives none of this: its assignment of blocks to workers depends on
timing, ``equal=True`` drops rows that the workers do not divide, and its shuffle is a local
buffer.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from segplatform.data.shards import RowReader, SplitIndex
from segplatform.train.losses import unet_border_weights
from segplatform.train.transforms import TrainTransform

logger = logging.getLogger(__name__)

__all__ = [
    "BatchSpec",
    "TrainBatches",
    "class_statistics",
    "epoch_order",
    "eval_indices",
    "make_train_batch",
    "micro_batch_indices",
    "sample_seed",
]

TASK_SAMPLES = 32  # samples one decoding task decodes at most (in whole micro-batches) ...
TASK_PIXELS = 32 * 128 * 128  # ... and pixels: big crops decode slowly enough to go one at a time


# ---- order ----------------------------------------------------------------------------------


def epoch_order(rows: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``range(rows)`` that epoch ``epoch`` visits (from seed and epoch only)."""
    return np.random.default_rng([seed, epoch]).permutation(rows)


def micro_batch_indices(
    order: np.ndarray,
    iteration: int,
    micro: int,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    grad_accum: int,
) -> np.ndarray:
    """Split indices of micro-batch ``micro`` of worker ``rank`` at ``iteration`` of an epoch."""
    total = batch_size * grad_accum * world_size
    start = iteration * total + (micro * world_size + rank) * batch_size
    return order[start : start + batch_size]


def eval_indices(rows: int, rank: int, world_size: int) -> range:
    """The validation rows worker ``rank`` scores: every row once over all workers."""
    return range(rank, rows, max(world_size, 1))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint32)[0])


# ---- decoding + augmentation ----------------------------------------------------------------


@dataclass(frozen=True)
class BatchSpec:
    """What ``make_train_batch`` needs besides the rows (small and picklable)."""

    crop_size: tuple[int, int]
    scale_range: tuple[float, float]
    hflip: bool
    color_jitter: float
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    ignore_index: int
    seed: int
    border: tuple[float, float] | None = None  # U-Net eq. 2 (w0, sigma), or no weight map
    instances: bool = False  # also return instance maps (Mask R-CNN)

    @classmethod
    def from_config(
        cls, cfg: Any, *, in_channels: int, normalization: dict, ignore_index: int, instances: bool
    ) -> BatchSpec:
        return cls(
            crop_size=tuple(cfg.crop_size),
            scale_range=tuple(cfg.scale_range),
            hflip=cfg.hflip,
            color_jitter=cfg.color_jitter,
            in_channels=in_channels,
            mean=tuple(normalization["mean"]),
            std=tuple(normalization["std"]),
            ignore_index=ignore_index,
            seed=cfg.seed,
            border=(cfg.border_w0, cfg.border_sigma) if cfg.border_weights else None,
            instances=instances,
        )


@functools.lru_cache(maxsize=8)
def _transform(spec: BatchSpec) -> TrainTransform:
    return TrainTransform(
        crop_size=spec.crop_size,
        scale_range=spec.scale_range,
        hflip=spec.hflip,
        color_jitter=spec.color_jitter,
        in_channels=spec.in_channels,
        mean=spec.mean,
        std=spec.std,
        ignore_index=spec.ignore_index,
    )


def make_train_batch(
    rows: Sequence[dict[str, Any]],
    indices: Sequence[int],
    epoch: int,
    spec: BatchSpec,
) -> dict[str, np.ndarray]:
    """Decode and augment rows into one batch.

    ``rows[i]`` is split index ``indices[i]`` as ``RowReader.row`` gives it. Returns ``image``
    (N, C, h, w) float32, ``mask`` (N, h, w) int64, and ``weight`` (N, h, w) float32 (U-Net
    border weights) and ``instances`` (N, h, w) int64 (-1: no instance map) when the spec asks.
    DatasetError names the row that cannot be decoded.
    """
    from segplatform.data.format import DatasetError
    from segplatform.data.reader import decode_image, decode_mask

    transform = _transform(spec)
    images, masks, weights, instance_maps = [], [], [], []
    for values, index in zip(rows, indices):
        row_name = values["name"]
        try:
            image = decode_image(values["image"])
            mask = decode_mask(values["mask"])
            instance_map = None
            if spec.instances and values.get("instances") is not None:
                instance_map = decode_mask(values["instances"])
        except Exception as err:
            raise DatasetError(f"{row_name}: cannot decode ({err})") from err
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(spec.seed, epoch, int(index)))
            out = transform(image, mask, instance_map, source=row_name)
        images.append(out[0].numpy())
        masks.append(out[1].numpy())
        if spec.instances:
            instance_maps.append(out[2].numpy() if instance_map is not None else None)
        if spec.border is not None:
            w0, sigma = spec.border
            weights.append(
                unet_border_weights(
                    out[1].numpy(), w0=w0, sigma=sigma, ignore_index=spec.ignore_index
                ).astype(np.float32)
            )
    batch = {"image": np.stack(images), "mask": np.stack(masks)}  # (N, C, h, w), (N, h, w)
    if weights:
        batch["weight"] = np.stack(weights)  # (N, h, w)
    if spec.instances:
        blank = np.full_like(batch["mask"][0], -1)
        batch["instances"] = np.stack([m if m is not None else blank for m in instance_maps])
    return batch


def _narrow(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Integer maps in the smallest integer type that holds their values (``to_tensors`` widens
    them back), so a task's result is smaller to store and to read."""
    out = {}
    for key, array in batch.items():
        if array.dtype.kind in "iu" and array.size:
            low, high = int(array.min()), int(array.max())
            for dtype in (np.uint8, np.int16, np.int32):
                info = np.iinfo(dtype)
                if info.min <= low and high <= info.max:
                    array = array.astype(dtype)
                    break
        out[key] = array
    return out


def _decode_task(
    spec: BatchSpec, index: SplitIndex, work: list[tuple[list[int], int]]
) -> tuple[list[dict[str, np.ndarray]], tuple[str, int, int]]:
    """Ray task body: ``make_train_batch`` for each ``(indices, epoch)`` of ``work``, reading
    the rows from the dataset through this process's row-group cache; with ``(node id, row
    groups, bytes)`` this task read from the dataset."""
    import ray

    reader = RowReader(index)
    groups, read = reader.cache.reads, reader.cache.read_bytes
    batches = [
        _narrow(make_train_batch(reader.rows(indices), indices, epoch, spec))
        for indices, epoch in work
    ]
    node = ray.get_runtime_context().get_node_id()
    return batches, (node, reader.cache.reads - groups, reader.cache.read_bytes - read)


def to_tensors(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, Tensor]:
    """A decoded batch on ``device`` (pinned host memory and asynchronous copies on CUDA);
    integer maps as int64."""
    out = {}
    for key, array in batch.items():
        if array.dtype.kind in "iu":
            array = array.astype(np.int64)  # a copy: task results are read-only
        else:
            array = np.array(array, copy=True)
        tensor = torch.from_numpy(array)
        if device.type == "cuda":
            tensor = tensor.pin_memory().to(device, non_blocking=True)
        out[key] = tensor
    return out


class TrainBatches:
    """The micro-batches of one worker, from a step on, forever (see the module docstring)."""

    def __init__(
        self,
        rows: SplitIndex,
        spec: BatchSpec,
        *,
        batch_size: int,
        grad_accum: int,
        world_size: int,
        rank: int,
        tasks: int = 2,
        task_cpus: float = 0.5,
        node_id: str | None = None,
        task_samples: int = TASK_SAMPLES,
    ) -> None:
        self.rows, self.spec = rows, spec
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.world_size, self.rank = world_size, rank
        self.iters_per_epoch = rows.rows // (batch_size * grad_accum * world_size)
        if self.iters_per_epoch < 1:
            raise ValueError(f"{rows.source}: {rows.rows} rows, fewer than one iteration")
        self.tasks, self.task_cpus, self.node_id = tasks, task_cpus, node_id
        self.task_samples = task_samples
        self._reader = RowReader(rows)  # inline decoding
        # Node id -> [row groups, bytes] the decoding of this worker's batches read from the
        # dataset, per node it ran on (inline decoding counts as the worker's node, "").
        self.reads: dict[str, list[int]] = {}
        self._index_ref: Any = None  # the index in Ray's object store, for the tasks
        self._epoch_order: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, iteration within the epoch)`` of global iteration ``step``."""
        return divmod(step, self.iters_per_epoch)

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, epoch_order(self.rows.rows, self.spec.seed, epoch))
        return self._epoch_order[1]

    def _requests(
        self, start_step: int, stop_step: int | None
    ) -> Iterator[tuple[int, int, int, np.ndarray]]:
        step = start_step
        while stop_step is None or step < stop_step:
            epoch, iteration = self.position(step)
            order = self._order(epoch)
            for micro in range(self.grad_accum):
                indices = micro_batch_indices(
                    order,
                    iteration,
                    micro,
                    rank=self.rank,
                    world_size=self.world_size,
                    batch_size=self.batch_size,
                    grad_accum=self.grad_accum,
                )
                yield step, epoch, micro, indices
            step += 1

    def _decode_inline(self, epoch: int, indices: np.ndarray) -> dict[str, np.ndarray]:
        picked = indices.tolist()
        cache = self._reader.cache
        groups, read = cache.reads, cache.read_bytes
        batch = make_train_batch(self._reader.rows(picked), picked, epoch, self.spec)
        self._count(self.node_id or "", cache.reads - groups, cache.read_bytes - read)
        return batch

    def _count(self, node: str, groups: int, read: int) -> None:
        total = self.reads.setdefault(node, [0, 0])
        total[0] += groups
        total[1] += read

    def _submit(self, work: list[tuple[int, np.ndarray]]) -> Any:
        """One Ray task decoding the ``(epoch, indices)`` micro-batches of ``work``."""
        import ray

        if self._index_ref is None:
            self._index_ref = ray.put(self.rows)
        payload = [(indices.tolist(), epoch) for epoch, indices in work]
        return _remote(self.task_cpus, self.node_id).remote(self.spec, self._index_ref, payload)

    def __call__(
        self, start_step: int, device: torch.device, stop_step: int | None = None
    ) -> Iterator[tuple[int, int, int, dict[str, Tensor]]]:
        """Yield ``(step, epoch, micro, batch)`` from ``start_step`` up to ``stop_step``
        (excluded; None: forever). Nothing past ``stop_step`` is decoded."""
        import ray

        requests = self._requests(start_step, stop_step)
        if self.tasks == 0:
            for step, epoch, micro, indices in requests:
                yield step, epoch, micro, to_tensors(self._decode_inline(epoch, indices), device)
            return
        crop_pixels = self.spec.crop_size[0] * self.spec.crop_size[1]
        samples = min(self.task_samples, max(1, TASK_PIXELS // crop_pixels))
        full = max(1, -(-samples // self.batch_size))  # micro-batches per task
        size = 1
        pending: deque[tuple[list[tuple[int, int, int]], Any]] = deque()

        def submit() -> None:
            nonlocal size
            keys, work = [], []
            for step, epoch, micro, indices in itertools.islice(requests, size):
                keys.append((step, epoch, micro))
                work.append((epoch, indices))
            if work:
                pending.append((keys, self._submit(work)))
            size = min(2 * size, full)

        try:
            for _ in range(self.tasks):
                submit()
            while pending:
                keys, handle = pending.popleft()
                decoded, reads = ray.get(handle)
                self._count(*reads)
                for position, ((step, epoch, micro), batch) in enumerate(zip(keys, decoded)):
                    yield step, epoch, micro, to_tensors(batch, device)
                    if position == 0:
                        # The next task goes in once the consumer is back for more, not as soon
                        # as this one ends: the ended task's worker has by then returned its
                        # lease, so Ray reuses a process that is already warm instead of
                        # starting a decoding process more (seconds of imports, ~800 MB).
                        submit()
        finally:
            for _, handle in pending:
                ray.cancel(handle)


@functools.lru_cache(maxsize=4)
def _remote(cpus: float, node_id: str | None) -> Any:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options: dict[str, Any] = {"num_cpus": cpus, "max_retries": 3}
    if node_id:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=True)
    return ray.remote(_decode_task).options(**options)


# ---- class statistics -----------------------------------------------------------------------


def _count_task(
    num_classes: int, ignore_index: int, index: SplitIndex, shard: int
) -> tuple[Any, Any]:
    """Class pixel counts of one shard, read from the dataset group by group."""
    from segplatform.data.reader import decode_mask
    from segplatform.train.losses import class_pixel_statistics

    reader = RowReader(index)
    first = index.offsets[shard]
    masks = (reader.row(i)["mask"] for i in range(first, first + index.shards[shard].rows))
    return class_pixel_statistics((decode_mask(m) for m in masks), num_classes, ignore_index)


def class_statistics(rows: SplitIndex, num_classes: int, ignore_index: int) -> list[float]:
    """Median-frequency class weights over a split (one Ray task per shard)."""
    import ray

    from segplatform.train.losses import median_frequency_weights

    task = ray.remote(num_cpus=0.5)(_count_task)
    index = ray.put(dataclasses.replace(rows, columns=("id", "mask")))
    counts = ray.get(
        [task.remote(num_classes, ignore_index, index, shard) for shard in range(len(rows.shards))]
    )
    class_pixels = np.sum([c for c, _ in counts], axis=0)
    image_pixels = np.sum([i for _, i in counts], axis=0)
    return median_frequency_weights(class_pixels, image_pixels)
