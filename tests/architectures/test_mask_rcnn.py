"""Mask R-CNN's own contract: torchvision's losses and detections, the semantic-map helper, the
dataset-row adapter, configuration errors and loading weights from local files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from architectures import ARCHITECTURES, build_config, build_from_config, build_model
from architectures.backbones import ResNet
from architectures.mask_rcnn import (
    LOSS_KEYS,
    MaskRCNN,
    MaskRCNNConfig,
    detections_to_semantic,
    semantic_scores,
)
from segplatform.detection import targets_from_masks, targets_from_row


def _two_objects(size: int = 64) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    semantic = np.zeros((size, size), dtype=np.uint8)
    semantic[8:28, 10:40] = 1
    semantic[40:60, 5:20] = 2
    targets = targets_from_masks(semantic)
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=generator) for _ in range(2)]
    return images, [targets, targets]


@pytest.mark.parametrize("version", [1, 2])
def test_training_returns_the_five_finite_losses_and_backward_reaches_every_trainable_parameter(
    version: int,
) -> None:
    torch.manual_seed(0)
    model = build_model("mask_rcnn", **vars(MaskRCNNConfig.tiny(version=version)))
    model.train()
    images, targets = _two_objects()
    losses = model(images, targets)
    assert set(losses) == set(LOSS_KEYS) == set(model.loss_weights())
    assert all(torch.isfinite(value) and value.dim() == 0 for value in losses.values())
    sum(model.loss_weights()[k] * v for k, v in losses.items()).backward()
    no_grad = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []


def test_empty_targets_train() -> None:
    torch.manual_seed(0)
    model = MaskRCNN(MaskRCNNConfig.tiny())
    model.train()
    images, _ = _two_objects()
    empty = targets_from_masks(np.zeros((64, 64), dtype=np.uint8))
    losses = model(images, [empty, empty])
    assert torch.isfinite(sum(losses.values()))
    assert float(losses["loss_mask"].detach()) == 0.0  # no positive RoI, no mask loss


def test_eval_returns_detections_at_input_size_and_a_semantic_view() -> None:
    torch.manual_seed(0)
    config = MaskRCNNConfig.tiny(num_classes=3, box_score_thresh=0.0)
    model = build_from_config("mask_rcnn", config).eval()
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 80)]
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for image, det in zip(images, detections):
        n = det["boxes"].shape[0]
        assert 0 < n <= config.box_detections_per_img
        assert det["boxes"].shape == (n, 4)
        assert det["labels"].shape == det["scores"].shape == (n,)
        assert det["masks"].shape == (n, 1, *image.shape[-2:])
        assert int(det["labels"].min()) >= 1 and int(det["labels"].max()) < 3
        label_map = detections_to_semantic(det, image.shape[-2:], score_threshold=0.0)
        assert label_map.shape == image.shape[-2:] and label_map.dtype == torch.int64
    out = model.semantic_forward(torch.stack([images[0], images[0]]))["out"]
    assert out.shape == (2, 3, 64, 64)
    assert torch.equal(out.sum(dim=1), torch.ones(2, 64, 64))  # one-hot
    with pytest.raises(RuntimeError, match="eval mode"):
        model.train().semantic_forward([images[0]])


def test_semantic_map_paints_higher_scores_last() -> None:
    masks = torch.zeros(3, 1, 6, 6)
    masks[0, 0, 0:4, 0:4] = 0.9  # label 1, score 0.6
    masks[1, 0, 2:6, 2:6] = 0.8  # label 2, score 0.9: wins the overlap 2:4 × 2:4
    masks[2, 0, 0:6, 0:6] = 0.95  # label 3, score 0.3: below the score threshold
    detections = {
        "boxes": torch.zeros(3, 4),
        "labels": torch.tensor([1, 2, 3]),
        "scores": torch.tensor([0.6, 0.9, 0.3]),
        "masks": masks,
    }
    label_map = detections_to_semantic(detections, (6, 6))
    expected = torch.zeros(6, 6, dtype=torch.long)
    expected[0:4, 0:4] = 1
    expected[2:6, 2:6] = 2
    assert torch.equal(label_map, expected)
    # Lower the score threshold: the big low-score mask fills only what the others leave.
    expected_low = torch.full((6, 6), 3, dtype=torch.long)
    expected_low[0:4, 0:4] = 1
    expected_low[2:6, 2:6] = 2
    assert torch.equal(
        detections_to_semantic(detections, (6, 6), score_threshold=0.2), expected_low
    )
    # Mask threshold: 0.85 drops detection 2's mask (0.8), so detection 1 keeps the overlap.
    only_first = detections_to_semantic(detections, (6, 6), mask_threshold=0.85)
    assert int(only_first[3, 3]) == 1 and int(only_first[5, 5]) == 0
    scores = semantic_scores(detections, (6, 6), 4)
    assert scores.shape == (4, 6, 6)
    assert torch.equal(scores.argmax(dim=0), expected)
    with pytest.raises(ValueError, match="num_classes"):
        semantic_scores(detections, (6, 6), 2)
    with pytest.raises(ValueError, match="image_size"):
        detections_to_semantic(detections, (5, 6))


def test_semantic_map_without_detections_is_background() -> None:
    empty = {"labels": torch.zeros(0), "scores": torch.zeros(0), "masks": torch.zeros(0, 1, 4, 5)}
    assert torch.equal(detections_to_semantic(empty, (4, 5)), torch.zeros(4, 5, dtype=torch.long))
    assert int(detections_to_semantic(empty, (4, 5), background=7).unique()) == 7


def test_targets_from_connected_components_per_class() -> None:
    mask = np.zeros((10, 12), dtype=np.uint8)
    mask[1:3, 1:4] = 1  # class 1, component A (6 px)
    mask[6:9, 8:11] = 1  # class 1, component B (9 px)
    mask[5, 2] = 2  # class 2, one pixel
    mask[6, 3] = 2  # diagonal neighbour: same 8-connected component
    mask[0, 11] = 255  # ignore: never an instance
    targets = targets_from_masks(mask)
    assert targets["labels"].tolist() == [1, 1, 2]
    assert targets["boxes"].dtype == torch.float32 and targets["masks"].dtype == torch.uint8
    assert targets["boxes"].tolist() == [[1, 1, 4, 3], [8, 6, 11, 9], [2, 5, 4, 7]]
    assert targets["masks"].shape == (3, 10, 12)
    assert targets["masks"].sum(dim=(1, 2)).tolist() == [6, 9, 2]
    four = targets_from_masks(mask, connectivity=1)
    assert four["labels"].tolist() == [1, 1, 2, 2]
    assert targets_from_masks(mask, min_area=3)["labels"].tolist() == [1, 1]


def test_targets_from_instances_use_the_majority_class() -> None:
    mask = np.zeros((8, 8), dtype=np.uint8)
    instances = np.zeros((8, 8), dtype=np.int32)
    instances[0:4, 0:4] = 5
    mask[0:4, 0:4] = 2
    mask[0, 0:3] = 1  # minority class inside instance 5
    mask[3, 3] = 255  # ignore pixel inside instance 5: left out of its mask
    instances[5:8, 5:8] = 9
    mask[5:8, 5:8] = 1
    mask[5, 5] = 0  # background inside instance 9 (does not vote, stays in the mask)
    instances[7, 0] = 11  # an instance on background only: dropped
    targets = targets_from_row({"id": "r", "mask": mask, "instances": instances})
    assert targets["labels"].tolist() == [2, 1]
    assert targets["boxes"].tolist() == [[0, 0, 4, 4], [5, 5, 8, 8]]
    assert targets["masks"].sum(dim=(1, 2)).tolist() == [15, 9]
    with pytest.raises(ValueError, match=r"row 'r'.*shape"):
        targets_from_row({"id": "r", "mask": mask, "instances": instances[:4]})


def test_empty_targets_have_torchvision_shapes() -> None:
    targets = targets_from_masks(np.full((5, 7), 255, dtype=np.uint8))
    assert targets["boxes"].shape == (0, 4)
    assert targets["labels"].shape == (0,) and targets["labels"].dtype == torch.int64
    assert targets["masks"].shape == (0, 5, 7)


def test_unknown_parameters_and_bad_values_are_errors() -> None:
    assert ARCHITECTURES["mask_rcnn"] == (MaskRCNNConfig, MaskRCNN)
    assert MaskRCNN.task == "instance"
    with pytest.raises(TypeError, match="no_such_field"):
        build_model("mask_rcnn", no_such_field=1)
    for field, value in [
        ("version", 3),
        ("num_classes", 1),
        ("backbone", "vgg16"),
        ("trainable_backbone_layers", 6),
        ("anchor_sizes", (8, 16)),
        ("image_mean", (0.5,)),
        ("min_size", 0),
    ]:
        with pytest.raises(ValueError, match=field):
            build_config("mask_rcnn", **{field: value})


def test_paper_config_matches_torchvision_and_defaults() -> None:
    config = MaskRCNNConfig()
    assert (config.min_size, config.max_size, config.num_classes) == (800, 1333, 91)
    assert config.pretrained is None and config.pretrained_backbone is None
    for version, reference in [
        (1, torchvision.models.detection.maskrcnn_resnet50_fpn),
        (2, torchvision.models.detection.maskrcnn_resnet50_fpn_v2),
    ]:
        ours = MaskRCNN(MaskRCNNConfig(num_classes=5, version=version)).state_dict()
        theirs = reference(weights=None, weights_backbone=None, num_classes=5).state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_pretrained_files_load_and_freeze_the_backbone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    body_file = tmp_path / "resnet_tiny.safetensors"
    body = ResNet("resnet_tiny")
    save_file({k: v.contiguous() for k, v in body.state_dict().items()}, str(body_file))
    with_body = MaskRCNN(MaskRCNNConfig.tiny(pretrained_backbone=str(body_file)))
    assert torch.equal(with_body.backbone.body.conv1.weight, body.conv1.weight)
    trainable = {n.split(".")[2] for n, p in with_body.named_parameters() if p.requires_grad}
    assert "conv1" not in trainable and "layer1" not in trainable and "layer4" in trainable

    source = MaskRCNN(MaskRCNNConfig.tiny(num_classes=6))
    full_file = tmp_path / "maskrcnn.pth"
    torch.save(source.state_dict(), full_file)
    loaded = MaskRCNN(MaskRCNNConfig.tiny(num_classes=3, pretrained=str(full_file)))
    same = source.roi_heads.mask_head[0][0].weight
    assert torch.equal(loaded.roi_heads.mask_head[0][0].weight, same)
    assert loaded.roi_heads.box_predictor.cls_score.out_features == 3  # re-initialised head
    with pytest.raises(ValueError, match="v2"):
        MaskRCNN(MaskRCNNConfig.tiny(version=2, pretrained=str(full_file)))
