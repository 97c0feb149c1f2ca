"""Parameter and multiply-accumulate (MAC) counts of a model.

MACs are counted by running one forward pass under ``torch.utils.flop_counter.FlopCounterMode``
(eval mode, no autograd), which counts the FLOPs of matrix multiplications and convolutions
(2 FLOPs per multiply-accumulate; biases, normalisation, activations, pooling and interpolation
are not counted); ``count_macs`` returns FLOPs / 2. This is the convention of torchvision's model
table, whose "GFLOPS" column is in fact GMACs.

    >>> from architectures import build_model
    >>> from architectures.flops import count_macs, count_params
    >>> model = build_model("deeplab_v1")
    >>> count_params(model), count_macs(model, input_size=(513, 513))

Detection models (``mask_rcnn``: torchvision's ``GeneralizedRCNN`` contract) take a list of
(C, H, W) images; ``count_macs`` detects them (or is told with ``image_list=True``) and passes
``batch_size`` random images. Their count depends on the input: the model's transform resizes
every image (torchvision: shorter side to 800 pixels), and the mask head's cost grows with the
number of detections, so report the input size together with the number.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs", "count_params", "is_image_list_model"]


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor once); ``trainable_only`` skips frozen ones."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def is_image_list_model(model: nn.Module) -> bool:
    """Whether ``model`` takes a list of images (torchvision's detection models do).

    True for a model whose ``task`` attribute is ``"instance"`` (``mask_rcnn``) or that contains
    torchvision's ``GeneralizedRCNNTransform``.
    """
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    if getattr(model, "task", None) == "instance":
        return True
    return any(isinstance(module, GeneralizedRCNNTransform) for module in model.modules())


def count_macs(
    model: nn.Module,
    input_size: tuple[int, int] = (512, 512),
    in_channels: int = 3,
    batch_size: int = 1,
    *,
    image_list: bool | None = None,
) -> int:
    """Multiply-accumulates of one forward pass on a ``batch_size × in_channels × H × W`` input.

    The model runs in eval mode under ``torch.no_grad()`` and is put back into its previous mode.
    ``image_list`` (default: detected) passes a list of (C, H, W) images instead of one batch.
    """
    height, width = input_size
    if height < 1 or width < 1 or in_channels < 1 or batch_size < 1:
        raise ValueError(
            f"count_macs: input_size {input_size}, in_channels {in_channels} and batch_size "
            f"{batch_size} must all be positive"
        )
    if image_list is None:
        image_list = is_image_list_model(model)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, in_channels, height, width, generator=generator).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            if image_list:
                model(list(images.unbind(0)))
            else:
                model(images)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
