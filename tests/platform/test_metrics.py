"""Tests of segplatform.metrics: FCN §5 definitions, torchmetrics agreement, merging, all-reduce."""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segplatform.metrics import ConfusionMatrix, format_table

IGNORE = 255


def random_batches(
    seed: int, batches: int, num_labels: int, size: int = 24
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pred, target) label batches using labels < num_labels, ~10 % ignored target pixels."""
    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(batches):
        target = torch.randint(0, num_labels, (2, size, size), generator=generator)
        noise = torch.randint(0, num_labels, (2, size, size), generator=generator)
        keep = torch.rand((2, size, size), generator=generator) < 0.6
        pred = torch.where(keep, target, noise)  # correlated with the target
        ignored = torch.rand((2, size, size), generator=generator) < 0.1
        target = target.masked_fill(ignored, IGNORE)
        result.append((pred, target))
    return result


def test_hand_computed_example_with_absent_class() -> None:
    # 4 classes; class 3 appears in neither prediction nor target; one pixel ignored.
    target = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, IGNORE]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 2, 0, 0]]])
    cm = ConfusionMatrix(4, ignore_index=IGNORE)
    cm.update(pred, target)
    expected_matrix = torch.tensor(
        [
            [1, 1, 1, 0],  # target 0: predicted 0, 1, 2
            [0, 2, 0, 0],  # target 1: predicted 1 twice
            [1, 0, 1, 0],  # target 2: predicted 0 and 2
            [0, 0, 0, 0],
        ]
    )
    assert torch.equal(cm.matrix, expected_matrix)
    result = cm.compute()
    # t = (3, 2, 2, 0), column sums = (2, 3, 2, 0), diagonal = (1, 2, 1, 0).
    assert result["pixel_acc"] == pytest.approx(4 / 7)
    assert result["acc"][:3] == pytest.approx([1 / 3, 1.0, 1 / 2])
    assert result["mean_acc"] == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)  # = 11/18
    assert result["iou"][:3] == pytest.approx([1 / 4, 2 / 3, 1 / 3])
    assert result["miou"] == pytest.approx((1 / 4 + 2 / 3 + 1 / 3) / 3)  # = 5/12
    assert result["fwiou"] == pytest.approx((3 * 1 / 4 + 2 * 2 / 3 + 2 * 1 / 3) / 7)  # = 11/28
    assert math.isnan(result["iou"][3]) and math.isnan(result["acc"][3])
    assert all(isinstance(result[key], float) for key in ("pixel_acc", "mean_acc", "miou"))
    assert all(type(value) is float for value in result["iou"] + result["acc"])


def test_class_only_predicted_counts_as_zero_iou() -> None:
    # Class 1 is predicted but never in the target: IoU 0 (counted), accuracy undefined.
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))
    result = cm.compute()
    assert result["iou"][:2] == [0.5, 0.0]
    assert math.isnan(result["iou"][2])
    assert result["acc"][0] == 0.5 and math.isnan(result["acc"][1])
    assert result["miou"] == pytest.approx(0.25)
    assert result["mean_acc"] == pytest.approx(0.5)
    assert result["pixel_acc"] == pytest.approx(0.5)
    assert result["fwiou"] == pytest.approx(0.5)


def test_whole_dataset_accumulation_is_not_a_per_image_average() -> None:
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[1, 1, 1, 1]]), torch.tensor([[1, 1, 1, 1]]))  # image mIoU 1.0
    cm.update(torch.tensor([[0]]), torch.tensor([[1]]))  # image mIoU 0.0
    # Over all pixels: class 0 IoU 0/1, class 1 IoU 4/5.
    assert cm.compute()["miou"] == pytest.approx((0 + 4 / 5) / 2)


def test_agrees_with_torchmetrics_on_random_data() -> None:
    # Imported here so that the spawned all-reduce workers do not pay for it.
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    num_classes = 7  # labels 0..5 occur; class 6 never occurs
    batches = random_batches(seed=0, batches=4, num_labels=6)
    ours = ConfusionMatrix(num_classes, ignore_index=IGNORE)
    per_class = MulticlassJaccardIndex(num_classes=num_classes, ignore_index=IGNORE, average=None)
    macro = MulticlassJaccardIndex(num_classes=num_classes, ignore_index=IGNORE, average="macro")
    weighted = MulticlassJaccardIndex(
        num_classes=num_classes, ignore_index=IGNORE, average="weighted"
    )
    micro_acc = MulticlassAccuracy(num_classes=num_classes, ignore_index=IGNORE, average="micro")
    for index, (pred, target) in enumerate(batches):
        if index % 2:  # feed logits for half the batches
            logits = torch.nn.functional.one_hot(pred, num_classes).permute(0, 3, 1, 2).float()
            ours.update(logits + 0.01 * torch.rand_like(logits), target)
        else:
            ours.update(pred, target)
        for metric in (per_class, macro, weighted, micro_acc):
            metric.update(pred, target)
    result = ours.compute()
    reference_iou = per_class.compute().tolist()
    # torchmetrics reports 0 for a class absent from both; we report NaN and leave it out.
    assert result["iou"][:6] == pytest.approx(reference_iou[:6], abs=1e-6)
    assert reference_iou[6] == 0.0 and math.isnan(result["iou"][6])
    assert result["miou"] == pytest.approx(macro.compute().item(), abs=1e-6)
    assert result["fwiou"] == pytest.approx(weighted.compute().item(), abs=1e-6)
    assert result["pixel_acc"] == pytest.approx(micro_acc.compute().item(), abs=1e-6)
    assert 0.3 < result["miou"] < 0.9  # the data is neither trivial nor random


def test_merging_worker_matrices_equals_one_matrix() -> None:
    batches = random_batches(seed=1, batches=6, num_labels=5)
    whole = ConfusionMatrix(5)
    for pred, target in batches:
        whole.update(pred, target)
    workers = [ConfusionMatrix(5) for _ in range(3)]
    for index, (pred, target) in enumerate(batches):
        workers[index % 3].update(pred, target)
    merged = ConfusionMatrix(5)
    for worker in workers:
        merged.merge(worker)
    assert torch.equal(merged.matrix, whole.matrix)
    assert merged.compute() == whole.compute()
    assert not torch.equal(workers[0].matrix, whole.matrix)
    with pytest.raises(ValueError, match="num_classes=4"):
        merged.merge(ConfusionMatrix(4))


def test_all_reduce_is_a_noop_without_torch_distributed() -> None:
    assert not dist.is_initialized()
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))
    before = cm.matrix.clone()
    assert cm.all_reduce() is cm
    assert torch.equal(cm.matrix, before)


def _all_reduce_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        cm = ConfusionMatrix(5)
        for index, (pred, target) in enumerate(random_batches(seed=2, batches=6, num_labels=5)):
            if index % world_size == rank:
                cm.update(pred, target)
        cm.all_reduce()
        with open(f"{out_dir}/rank{rank}.json", "w") as handle:
            json.dump(cm.to_dict(), handle)
    finally:
        dist.destroy_process_group()


def test_all_reduce_across_two_gloo_processes(tmp_path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_all_reduce_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = ConfusionMatrix(5)
    for pred, target in random_batches(seed=2, batches=6, num_labels=5):
        single.update(pred, target)
    for rank in range(2):
        reduced = ConfusionMatrix.from_dict(json.loads((tmp_path / f"rank{rank}.json").read_text()))
        assert torch.equal(reduced.matrix, single.matrix), f"rank {rank}"


def test_json_round_trip_and_from_dict_errors() -> None:
    cm = ConfusionMatrix(3, ignore_index=IGNORE)
    for pred, target in random_batches(seed=3, batches=2, num_labels=3):
        cm.update(pred, target)
    again = ConfusionMatrix.from_dict(json.loads(json.dumps(cm.to_dict())))
    assert torch.equal(again.matrix, cm.matrix) and again.ignore_index == IGNORE
    with pytest.raises(ValueError, match=r"eval\.json: missing field 'matrix'"):
        ConfusionMatrix.from_dict({"num_classes": 3}, source="eval.json")
    with pytest.raises(ValueError, match="row 1 holds -1"):
        ConfusionMatrix.from_dict({"num_classes": 2, "matrix": [[0, 0], [-1, 0]]})


def test_bad_input_is_rejected_with_a_message() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="target label 3 is outside"):
        cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match="predicted label 7"):
        cm.update(torch.tensor([[0, 7]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="differ in shape"):
        cm.update(
            torch.zeros((1, 2, 2), dtype=torch.long), torch.zeros((1, 2, 3), dtype=torch.long)
        )
    with pytest.raises(ValueError, match="4 channels"):
        cm.update(torch.zeros((1, 4, 2, 2)), torch.zeros((1, 2, 2), dtype=torch.long))
    with pytest.raises(ValueError, match="integer labels"):
        cm.update(torch.zeros((1, 2, 2)), torch.zeros((1, 2, 2), dtype=torch.long))
    assert int(cm.matrix.sum()) == 0  # nothing was counted by a rejected batch
    empty = cm.compute()
    assert all(math.isnan(empty[key]) for key in ("pixel_acc", "mean_acc", "miou", "fwiou"))


def test_format_table_lists_classes_and_marks_undefined() -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))
    table = format_table(cm.compute(), ["background", "road", "sky"])
    lines = table.splitlines()
    assert lines[2].split() == ["background", "50.00", "50.00"]
    assert lines[3].split() == ["road", "0.00", "-"]
    assert lines[4].split() == ["sky", "-", "-"]
    assert "mean IoU" in table and "25.00" in table
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        format_table(cm.compute(), ["a", "b"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_update_on_cuda_matches_cpu() -> None:
    batches = random_batches(seed=4, batches=3, num_labels=4)
    on_cpu, on_gpu = ConfusionMatrix(4), ConfusionMatrix(4)
    for pred, target in batches:
        on_cpu.update(pred, target)
        on_gpu.update(pred.cuda(), target.cuda())
    assert on_gpu.matrix.device.type == "cuda"
    assert torch.equal(on_gpu.matrix.cpu(), on_cpu.matrix)
    assert on_gpu.compute() == on_cpu.compute()
