"""The training data path: global order per epoch, exact-once validation, identical batches
from Ray tasks and inline decoding, and the same global batches for any worker count."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from segplatform.data.shards import open_split, read_split_tables
from segplatform.train.batches import (
    BatchSpec,
    TrainBatches,
    epoch_order,
    eval_indices,
    micro_batch_indices,
)

SPEC = BatchSpec(
    crop_size=(32, 32),
    scale_range=(0.5, 2.0),
    hflip=True,
    color_jitter=0.2,
    in_channels=3,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    ignore_index=255,
    seed=7,
)


def test_every_row_once_per_epoch_and_a_new_order_each_epoch() -> None:
    rows, world, batch, accum = 23, 2, 2, 2
    total = world * batch * accum
    for epoch in range(3):
        order = epoch_order(rows, seed=5, epoch=epoch)
        seen = [
            int(i)
            for iteration in range(rows // total)
            for micro in range(accum)
            for rank in range(world)
            for i in micro_batch_indices(
                order, iteration, micro, rank=rank, world_size=world, batch_size=batch,
                grad_accum=accum,
            )
        ]  # fmt: skip
        assert len(seen) == len(set(seen)) == (rows // total) * total
        assert seen == order[: len(seen)].tolist()  # ranks and micro-batches tile the order
    assert not np.array_equal(epoch_order(23, 5, 0), epoch_order(23, 5, 1))
    assert np.array_equal(epoch_order(23, 5, 1), epoch_order(23, 5, 1))  # (seed, epoch) only


def test_a_global_batch_is_the_same_for_one_worker_or_two() -> None:
    order = epoch_order(40, seed=1, epoch=0)
    one = micro_batch_indices(order, 3, 0, rank=0, world_size=1, batch_size=8, grad_accum=1)
    two = np.concatenate(
        [
            micro_batch_indices(order, 3, 0, rank=r, world_size=2, batch_size=4, grad_accum=1)
            for r in range(2)
        ]
    )
    assert one.tolist() == two.tolist()


@pytest.mark.parametrize(("rows", "world"), [(7, 2), (5, 3), (4, 4), (3, 5), (12, 1)])
def test_validation_scores_every_row_exactly_once(rows: int, world: int) -> None:
    scored = [i for rank in range(world) for i in eval_indices(rows, rank, world)]
    assert sorted(scored) == list(range(rows))


def test_tasks_and_inline_decoding_give_identical_batches_and_resume_continues(
    ray_cluster: None, shapes_dataset: str
) -> None:
    rows = open_split(shapes_dataset, "train", expected_rows=16)
    device = torch.device("cpu")

    def take(
        tasks: int, start: int, count: int, task_samples: int = 32
    ) -> list[tuple[int, int, dict]]:
        loader = TrainBatches(
            rows,
            SPEC,
            batch_size=2,
            grad_accum=1,
            world_size=2,
            rank=1,
            tasks=tasks,
            task_samples=task_samples,
        )
        out = []
        for step, epoch, _, batch in loader(start, device):
            out.append((step, epoch, batch))
            if len(out) == count:
                return out
        raise AssertionError("unreachable")

    inline = take(0, 0, 6)
    remote = take(2, 0, 6)  # tasks of 1, 2, then 4 micro-batches (masks shipped as uint8)
    single = take(1, 0, 6, task_samples=1)  # one micro-batch per task
    assert [(s, e) for s, e, _ in inline] == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 1), (5, 1)]
    assert (
        [(s, e) for s, e, _ in remote]
        == [(s, e) for s, e, _ in single]
        == [(s, e) for s, e, _ in inline]
    )
    for (_, _, a), (_, _, b), (_, _, c) in zip(inline, remote, single):
        assert torch.equal(b["image"], c["image"]) and torch.equal(b["mask"], c["mask"])
        assert a.keys() == b.keys() == {"image", "mask"}
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert a["image"].shape == (2, 3, 32, 32) and a["mask"].dtype == torch.int64
    resumed = take(2, 4, 2)  # a worker restarted at step 4 gets steps 4 and 5 again
    for (_, _, a), (_, _, b) in zip(inline[4:], resumed):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    # A run that ends at step 5 gets steps 3 and 4 and then the end, nothing decoded past it.
    ending = TrainBatches(rows, SPEC, batch_size=2, grad_accum=1, world_size=2, rank=1, tasks=2)
    tail = list(ending(3, device, stop_step=5))
    assert [step for step, *_ in tail] == [3, 4]
    assert torch.equal(tail[1][3]["image"], inline[4][2]["image"])
    # Augmentation is random: two epochs never show a row the same way.
    assert not torch.equal(inline[0][2]["image"], inline[4][2]["image"])


def test_a_split_whose_shards_disagree_with_its_manifest_is_refused(shapes_dataset: str) -> None:
    from segplatform.data.format import DatasetError

    with pytest.raises(DatasetError, match=r"split 'val' has 4 rows in its shards but"):
        read_split_tables(shapes_dataset, "val", expected_rows=5)


def _take_inline(rows: object, steps: int) -> list[dict]:
    loader = TrainBatches(rows, SPEC, batch_size=2, grad_accum=1, world_size=1, rank=0, tasks=0)
    return [batch for _, _, _, batch in itertools.islice(loader(0, torch.device("cpu")), steps)]


def test_batches_do_not_depend_on_how_the_split_is_sharded_or_grouped(
    shapes_writer, tmp_path
) -> None:
    """A row's index is its place in the split, whatever the shards and row groups: one shard
    of one row group and seven shards of one-row groups give the same batches."""
    whole, fine = str(tmp_path / "whole"), str(tmp_path / "fine")
    shapes_writer(whole)
    shapes_writer(fine, max_shard_bytes=1, row_group_bytes=1)  # shards flush at every sample
    one, many = open_split(whole, "train"), open_split(fine, "train")
    assert (len(one.shards), len(many.shards)) == (1, 16) and one.rows == many.rows == 16
    assert len(one.shards[0].groups) == 1
    grouped = str(tmp_path / "grouped")
    shapes_writer(grouped, row_group_bytes=1)
    assert len(open_split(grouped, "train").shards[0].groups) == 16  # one row per group
    for a, b, c in zip(
        _take_inline(one, 5), _take_inline(many, 5), _take_inline(open_split(grouped, "train"), 5)
    ):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["image"], c["image"]) and torch.equal(a["mask"], c["mask"])


def test_the_index_holds_no_rows_and_readers_read_row_groups_through_a_bounded_cache(
    shapes_writer, tmp_path
) -> None:
    import pickle

    from segplatform.data.shards import RowGroupCache, RowReader

    uri = str(tmp_path / "grouped")
    shapes_writer(uri, train=16, row_group_bytes=1)
    index = open_split(uri, "train")
    whole = sum(t.nbytes for t in read_split_tables(uri, "train"))
    assert len(pickle.dumps(index)) < whole / 4  # paths and row counts, no image bytes
    group_bytes = whole // 16
    cache = RowGroupCache(limit=3 * group_bytes + group_bytes // 2)  # room for 3 groups
    reader = RowReader(index, cache)
    first = [reader.row(i)["id"] for i in range(4)]
    assert cache.reads == 4 and cache.bytes <= cache.limit  # the oldest group is out
    assert reader.row(3)["id"] == first[3] and cache.reads == 4  # a hit
    assert reader.row(0)["id"] == first[0] and cache.reads == 5  # read again
    (table,) = read_split_tables(uri, "train")
    expected = table.column("id").to_pylist()
    assert [reader.row(i)["id"] for i in range(16)] == expected


def test_a_shard_rewritten_under_a_run_is_refused_not_misread(shapes_writer, tmp_path) -> None:
    from segplatform.data.format import DatasetError
    from segplatform.data.shards import RowReader

    uri = str(tmp_path / "rewritten")
    shapes_writer(uri)
    index = open_split(uri, "train")
    shapes_writer(uri, train=12, overwrite=True)
    with pytest.raises(DatasetError, match=r"part-00000.parquet: the shard changed after the run"):
        RowReader(index).row(0)


def test_decoding_tasks_read_their_rows_from_the_dataset_and_count_it(
    ray_cluster: None, shapes_writer, tmp_path
) -> None:
    """No process has read this new dataset: the tasks' first batches read it from its files,
    on this (the only) node, and the loader counts the row groups and bytes per node."""
    import ray

    uri = str(tmp_path / "fresh")
    shapes_writer(uri, row_group_bytes=1)  # 16 one-row groups
    loader = TrainBatches(
        open_split(uri, "train"), SPEC, batch_size=2, grad_accum=1, world_size=1, rank=0, tasks=2
    )
    list(loader(0, torch.device("cpu"), stop_step=4))  # 8 rows
    ((node, (groups, read)),) = loader.reads.items()
    assert node == ray.get_runtime_context().get_node_id()
    assert groups == 8 and read > 0  # 8 rows, each its own row group, each read once
