"""Mask R-CNN on torchvision's implementation, with a semantic-map view of its detections.

Paper: Kaiming He, Georgia Gkioxari, Piotr Dollár, Ross Girshick, "Mask R-CNN", ICCV 2017,
arXiv:1703.06870. Official code: https://github.com/facebookresearch/Detectron (Caffe2) and
https://github.com/facebookresearch/detectron2. Implementation used here: torchvision's
``torchvision.models.detection.MaskRCNN`` (``maskrcnn_resnet50_fpn`` and, with ``version=2``,
``maskrcnn_resnet50_fpn_v2`` from Li et al., "Benchmarking Detection Transfer Learning with Vision
Transformers", arXiv:2111.11429).

The network (§3, Fig. 4 right, FPN variant): a ResNet-FPN backbone, a region proposal network, a
box head (RoIAlign 7×7 → two 1024-d FC layers → class scores and per-class box deltas) and a mask
head (RoIAlign 14×14×256 → four 3×3 conv 256 → 2×2 deconv to 28×28 → 1×1 conv to K per-class masks
with a per-pixel sigmoid; the mask loss reads only the ground-truth class of each positive RoI).

Contract (torchvision's, unchanged): ``model(images, targets)`` in training returns the loss dict
``loss_classifier``, ``loss_box_reg``, ``loss_mask``, ``loss_objectness``, ``loss_rpn_box_reg``;
``model(images)`` in eval returns one dict per image with ``boxes`` (N, 4) xyxy in input pixels,
``labels`` (N,), ``scores`` (N,) and ``masks`` (N, 1, H, W) probabilities at the input size.
Images are float tensors in [0, 1] (C, H, W), any sizes; the model resizes them (``min_size``,
``max_size``) and normalizes them with ``image_mean``/``image_std`` itself, as torchvision does.

Class mapping: our class ids are torchvision's labels. Class 0 is the background (torchvision's
label 0, never detected); class ``c >= 1`` is detection label ``c``. ``num_classes`` counts the
background. ``detections_to_semantic`` turns detections back into an (H, W) label map in which
every pixel not covered by a confident mask is class 0, so semantic metrics and endpoints serve
this model too (``MaskRCNN.semantic_forward`` gives the ``{"out": (N, K, H, W)}`` view).

Weights never come from the network: ``pretrained_backbone`` is a local path or URI of a
torchvision ResNet (ImageNet) state dict loaded into the backbone body; ``pretrained`` is a full
torchvision Mask R-CNN state dict (e.g. the COCO weights, saved once to disk) of the same
``version``; when ``num_classes`` differs from the file's, the class-dependent layers
(``roi_heads.box_predictor.*``, ``roi_heads.mask_predictor.mask_fcn_logits.*``) keep their fresh
initialisation.

Deviations from the paper:
- torchvision's implementation and training recipe, not Detectron's: RoIAlign with sampling
  ratio 2, torchvision's box coder weights and its COCO label space (91 ids, 80 used), hence the
  default ``num_classes=91``.
- Without any pretrained weights the backbone's batch norm layers are trained (``nn.BatchNorm2d``)
  and all backbone layers are trainable; the paper always starts from ImageNet weights with frozen
  batch norm, which is what happens here when ``pretrained_backbone`` or ``pretrained`` is given
  (version 1; version 2 trains batch norm, as torchvision's v2 recipe does).
- ``trainable_backbone_layers`` is honoured as given; torchvision silently forces 5 when no
  weights are loaded. ``None`` keeps torchvision's rule (3 with weights, 5 without).
- Loading a version-1 ``pretrained`` file sets the frozen batch norm epsilon to 0, as torchvision
  does for its COCO_V1 weights.
- Anchor sizes, proposal counts, head widths and the backbone depth are configurable so that a tiny
  configuration runs on a CPU; the defaults are the paper's R50-FPN.
- ``in_channels`` other than 3 is accepted (a new first convolution; grey images are normalized
  with the mean of ImageNet's statistics).
- The semantic map (``detections_to_semantic``) is not in the paper: overlapping masks are
  resolved by score (the higher score wins).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import (
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    TwoMLPHead,
)
from torchvision.models.detection.mask_rcnn import MaskRCNN as TorchvisionMaskRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from architectures.backbones import RESNET_DEPTHS, ResNet, load_pretrained, read_state_dict

__all__ = [
    "LOSS_KEYS",
    "MaskRCNN",
    "MaskRCNNConfig",
    "detections_to_semantic",
    "semantic_scores",
]

# The five losses torchvision's Mask R-CNN returns in training.
LOSS_KEYS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")

# Layers whose shape depends on num_classes (re-initialised when a pretrained file's differs).
_CLASS_DEPENDENT_PREFIXES = (
    "roi_heads.box_predictor.cls_score.",
    "roi_heads.box_predictor.bbox_pred.",
    "roi_heads.mask_predictor.mask_fcn_logits.",
)

# ImageNet statistics of torchvision's detection transform (RGB, images in [0, 1]).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

# Backbone body layers made trainable by ``trainable_backbone_layers`` (torchvision's order).
_TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")


@dataclass(frozen=True)
class MaskRCNNConfig:
    """Mask R-CNN R50-FPN as in the paper (§3.1, §3.2) and torchvision's defaults."""

    num_classes: int = 91  # classes incl. background 0 (torchvision's COCO label space: 91)
    in_channels: int = 3  # image channels
    version: int = 1  # 1: maskrcnn_resnet50_fpn; 2: maskrcnn_resnet50_fpn_v2 (BN heads, 2-conv RPN)
    backbone: str = "resnet50"  # ResNet body: resnet18/34/50/101/152 or resnet_tiny (tests)
    pretrained_backbone: str | None = None  # path/URI of a torchvision ResNet state dict
    pretrained: str | None = None  # path/URI of a full torchvision Mask R-CNN state dict
    trainable_backbone_layers: int | None = None  # 0..5 body stages trained; None: 3 w/ weights, 5
    min_size: int = 800  # shorter image side after the model's resize (paper: 800)
    max_size: int = 1333  # longer side cap after resize (paper: 1333)
    image_mean: tuple[float, ...] | None = None  # per-channel mean; None: ImageNet's
    image_std: tuple[float, ...] | None = None  # per-channel std; None: ImageNet's
    fpn_channels: int = 256  # FPN output width (paper: 256)
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one anchor size per FPN level P2..P6
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # anchor aspect ratios at every level
    rpn_pre_nms_top_n_train: int = 2000  # proposals per level kept before NMS, training
    rpn_post_nms_top_n_train: int = 2000  # proposals kept after NMS, training (FPN paper: 2000)
    rpn_pre_nms_top_n_test: int = 1000  # proposals per level kept before NMS, inference
    rpn_post_nms_top_n_test: int = 1000  # proposals kept after NMS, inference (FPN paper: 1000)
    rpn_batch_size_per_image: int = 256  # anchors sampled per image for the RPN loss
    box_batch_size_per_image: int = 512  # RoIs sampled per image for the heads (paper: 512)
    box_representation_size: int = 1024  # width of the box head's FC layers (paper: 1024)
    mask_head_channels: int = 256  # width of the mask head's four convs and deconv (paper: 256)
    box_score_thresh: float = 0.05  # detections below this score are dropped at inference
    box_detections_per_img: int = 100  # detections kept per image at inference (paper: 100)
    score_threshold: float = 0.5  # semantic map: detections below this score are not painted
    mask_threshold: float = 0.5  # semantic map: mask probability above which a pixel is painted

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + 1), got {self.num_classes}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {self.version}")
        if self.backbone not in RESNET_DEPTHS:
            raise ValueError(
                f"backbone must be one of {sorted(RESNET_DEPTHS)}, got {self.backbone}"
            )
        if (
            self.trainable_backbone_layers is not None
            and not 0 <= self.trainable_backbone_layers <= 5
        ):
            raise ValueError(
                f"trainable_backbone_layers must be in 0..5 or None, got "
                f"{self.trainable_backbone_layers}"
            )
        if not 0 < self.min_size <= self.max_size:
            raise ValueError(
                f"min_size and max_size must satisfy 0 < min_size <= max_size, got "
                f"{self.min_size} and {self.max_size}"
            )
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.in_channels:
                raise ValueError(f"{name} needs {self.in_channels} values, got {len(value)}")
        if self.image_std is not None and min(self.image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {self.image_std}")
        if len(self.anchor_sizes) != 5 or min(self.anchor_sizes) <= 0:
            raise ValueError(
                f"anchor_sizes needs 5 positive sizes (FPN levels P2..P6), got {self.anchor_sizes}"
            )
        if not self.aspect_ratios or min(self.aspect_ratios) <= 0:
            raise ValueError(f"aspect_ratios must be positive, got {self.aspect_ratios}")
        for name in (
            "fpn_channels",
            "rpn_pre_nms_top_n_train",
            "rpn_post_nms_top_n_train",
            "rpn_pre_nms_top_n_test",
            "rpn_post_nms_top_n_test",
            "rpn_batch_size_per_image",
            "box_batch_size_per_image",
            "box_representation_size",
            "mask_head_channels",
            "box_detections_per_img",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("box_score_thresh", "score_threshold", "mask_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @classmethod
    def tiny(cls, **overrides: Any) -> MaskRCNNConfig:
        """A CPU-sized Mask R-CNN: tiny ResNet-FPN, 64-px images, few proposals, narrow heads."""
        small = cls(
            num_classes=4,
            backbone="resnet_tiny",
            min_size=64,
            max_size=96,
            fpn_channels=32,
            anchor_sizes=(8, 16, 32, 64, 128),
            rpn_pre_nms_top_n_train=256,
            rpn_post_nms_top_n_train=128,
            rpn_pre_nms_top_n_test=128,
            rpn_post_nms_top_n_test=64,
            rpn_batch_size_per_image=64,
            box_batch_size_per_image=32,
            box_representation_size=128,
            mask_head_channels=32,
            box_detections_per_img=16,
        )
        return replace(small, **overrides)

    @property
    def loads_weights(self) -> bool:
        """Whether any pretrained weights are loaded (torchvision's ``is_trained``)."""
        return self.pretrained is not None or self.pretrained_backbone is not None


def _normalization(config: MaskRCNNConfig) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the model's transform (ImageNet's; grey: their averages)."""
    if config.in_channels == 3:
        mean, std = list(_IMAGENET_MEAN), list(_IMAGENET_STD)
    else:
        mean = [sum(_IMAGENET_MEAN) / 3] * config.in_channels
        std = [sum(_IMAGENET_STD) / 3] * config.in_channels
    if config.image_mean is not None:
        mean = list(config.image_mean)
    if config.image_std is not None:
        std = list(config.image_std)
    return mean, std


def _resnet_fpn(config: MaskRCNNConfig) -> BackboneWithFPN:
    """ResNet body + FPN with an extra max-pooled level (P2..P6), as torchvision builds it."""
    frozen_bn = config.version == 1 and config.loads_weights
    body = ResNet(
        config.backbone,
        in_channels=config.in_channels,
        norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d,
    )
    if config.pretrained_backbone is not None:
        load_pretrained(body, config.pretrained_backbone)
    trainable = config.trainable_backbone_layers
    if trainable is None:
        trainable = 3 if config.loads_weights else 5
    train_prefixes = [*_TRAINABLE_ORDER[:trainable], *(["bn1"] if trainable == 5 else [])]
    for name, parameter in body.named_parameters():
        if not any(name.startswith(prefix) for prefix in train_prefixes):
            parameter.requires_grad_(False)
    return BackboneWithFPN(
        body,
        return_layers={f"layer{i}": str(i - 1) for i in range(1, 5)},
        in_channels_list=[info.channels for info in body.feature_info],
        out_channels=config.fpn_channels,
        norm_layer=nn.BatchNorm2d if config.version == 2 else None,
    )


class MaskRCNN(TorchvisionMaskRCNN):
    """torchvision's Mask R-CNN (paper Fig. 4, FPN head) built from a ``MaskRCNNConfig``.

    State dict keys are torchvision's (``backbone.body.*``, ``backbone.fpn.*``, ``rpn.*``,
    ``roi_heads.*``), so torchvision checkpoints load unchanged.
    """

    task: ClassVar[str] = "instance"

    def __init__(self, config: MaskRCNNConfig) -> None:
        if not isinstance(config, MaskRCNNConfig):
            raise TypeError(f"mask_rcnn: expected a MaskRCNNConfig, got {type(config).__name__}")
        backbone = _resnet_fpn(config)
        channels = backbone.out_channels
        anchor_generator = AnchorGenerator(
            tuple((size,) for size in config.anchor_sizes),
            (tuple(config.aspect_ratios),) * len(config.anchor_sizes),
        )
        num_anchors = anchor_generator.num_anchors_per_location()[0]
        box_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
        mask_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=14, sampling_ratio=2)
        mask_widths = [config.mask_head_channels] * 4
        if config.version == 1:
            rpn_head = RPNHead(channels, num_anchors)
            box_head: nn.Module = TwoMLPHead(channels * 7 * 7, config.box_representation_size)
            mask_head = MaskRCNNHeads(channels, mask_widths, 1)
        else:
            rpn_head = RPNHead(channels, num_anchors, conv_depth=2)
            box_head = FastRCNNConvFCHead(
                (channels, 7, 7),
                [channels] * 4,
                [config.box_representation_size],
                norm_layer=nn.BatchNorm2d,
            )
            mask_head = MaskRCNNHeads(channels, mask_widths, 1, norm_layer=nn.BatchNorm2d)
        mean, std = _normalization(config)
        super().__init__(
            backbone,
            num_classes=None,
            min_size=config.min_size,
            max_size=config.max_size,
            image_mean=mean,
            image_std=std,
            rpn_anchor_generator=anchor_generator,
            rpn_head=rpn_head,
            rpn_pre_nms_top_n_train=config.rpn_pre_nms_top_n_train,
            rpn_pre_nms_top_n_test=config.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=config.rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=config.rpn_post_nms_top_n_test,
            rpn_batch_size_per_image=config.rpn_batch_size_per_image,
            box_roi_pool=box_roi_pool,
            box_head=box_head,
            box_predictor=FastRCNNPredictor(config.box_representation_size, config.num_classes),
            box_score_thresh=config.box_score_thresh,
            box_detections_per_img=config.box_detections_per_img,
            box_batch_size_per_image=config.box_batch_size_per_image,
            mask_roi_pool=mask_roi_pool,
            mask_head=mask_head,
            mask_predictor=MaskRCNNPredictor(
                config.mask_head_channels, config.mask_head_channels, config.num_classes
            ),
        )
        self.config = config
        if config.pretrained is not None:
            self._load_full(config.pretrained)

    def _load_full(self, uri: str) -> None:
        """Load a full torchvision Mask R-CNN state dict; class-dependent layers may differ."""
        state = read_state_dict(uri)
        own = self.state_dict()
        matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        missing = [
            k
            for k in own
            if k not in matched
            and not k.startswith(_CLASS_DEPENDENT_PREFIXES)
            and not k.endswith("num_batches_tracked")
        ]
        if missing:
            raise ValueError(
                f"{uri}: not a Mask R-CNN v{self.config.version} ({self.config.backbone}) "
                f"state dict for this config; {len(missing)} tensor(s) missing or of another "
                f"shape, e.g. "
                f"{missing[:3]}"
            )
        self.load_state_dict(matched, strict=False)
        if self.config.version == 1:
            for module in self.modules():
                if isinstance(module, FrozenBatchNorm2d):
                    module.eps = 0.0

    def loss_weights(self) -> dict[str, float]:
        """Weights of the training loss terms: all 1, the paper's sum L = L_cls + L_box + L_mask."""
        return dict.fromkeys(LOSS_KEYS, 1.0)

    @torch.no_grad()
    def semantic_forward(self, images: Tensor | Sequence[Tensor]) -> dict[str, Tensor]:
        """Detections as semantic scores: ``{"out": (N, K, H, W)}`` one-hot, argmax = label map.

        Eval mode only; all images must share one size. Thresholds come from the config.
        """
        if self.training:
            raise RuntimeError("mask_rcnn: semantic_forward needs eval mode (call model.eval())")
        if len({tuple(image.shape[-2:]) for image in images}) != 1:
            raise ValueError("mask_rcnn: semantic_forward needs images of one size")
        size = tuple(images[0].shape[-2:])
        detections = self(images)
        out = torch.stack(
            [
                semantic_scores(
                    d,
                    size,
                    self.config.num_classes,
                    score_threshold=self.config.score_threshold,
                    mask_threshold=self.config.mask_threshold,
                )
                for d in detections
            ]
        )  # (N, K, H, W)
        return {"out": out}


def detections_to_semantic(
    detections: Mapping[str, Tensor],
    image_size: tuple[int, int],
    *,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    background: int = 0,
) -> Tensor:
    """One image's detections → an (H, W) int64 label map.

    Each detection with ``score >= score_threshold`` paints its label on the pixels where its mask
    probability is ``> mask_threshold``; where masks overlap, the detection with the higher score
    wins (as if painted in increasing score order; on equal scores the one listed first wins). All
    other pixels are ``background``. ``detections`` is one element of the eval output: ``labels``
    (N,), ``scores`` (N,) and ``masks`` (N, 1, H, W) or (N, H, W) at ``image_size``.
    """
    height, width = int(image_size[0]), int(image_size[1])
    for key in ("labels", "scores", "masks"):
        if key not in detections:
            raise ValueError(f"detections lack {key!r} (have {sorted(detections)})")
    masks = detections["masks"]
    if masks.dim() == 4:
        masks = masks[:, 0]  # (N, H, W)
    if masks.dim() != 3 or tuple(masks.shape[-2:]) != (height, width):
        raise ValueError(
            f"detections' masks have shape {tuple(detections['masks'].shape)}; expected "
            f"(N, 1, {height}, {width}) for image_size {(height, width)}"
        )
    scores = detections["scores"].to(masks.device)
    labels = detections["labels"].to(masks.device, torch.long)
    label_map = torch.full((height, width), background, dtype=torch.long, device=masks.device)
    keep = scores >= score_threshold
    if not bool(keep.any()):
        return label_map
    masks, scores, labels = masks[keep], scores[keep], labels[keep]
    covered = masks > mask_threshold  # (N, H, W)
    ranked = torch.where(covered, scores[:, None, None], torch.full_like(masks, -1.0))
    best = ranked.argmax(dim=0)  # (H, W): the highest-scoring detection covering each pixel
    painted = covered.any(dim=0)  # (H, W)
    return torch.where(painted, labels[best], label_map)


def semantic_scores(
    detections: Mapping[str, Tensor],
    image_size: tuple[int, int],
    num_classes: int,
    *,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    background: int = 0,
) -> Tensor:
    """One-hot (K, H, W) float scores of ``detections_to_semantic``: argmax gives its map."""
    label_map = detections_to_semantic(
        detections,
        image_size,
        score_threshold=score_threshold,
        mask_threshold=mask_threshold,
        background=background,
    )  # (H, W)
    if int(label_map.max()) >= num_classes:
        raise ValueError(
            f"detection label {int(label_map.max())} is not below num_classes={num_classes}"
        )
    return F.one_hot(label_map, num_classes).permute(2, 0, 1).float()  # (K, H, W)
