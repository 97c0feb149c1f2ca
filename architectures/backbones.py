"""Backbones shared by the segmentation heads: VGG16 (plain and BN) and dilated ResNets.

Both are torchvision's own networks (``torchvision.models.vgg16`` / ``vgg16_bn`` /
``resnet18`` / ``resnet34`` / ``resnet50`` / ``resnet101`` / ``resnet152``), re-cut into stages so
that a head can read the features it needs. Every backbone reports, per output, its channel count
and stride (``feature_info``), so heads size themselves (the detectron2 convention).

Because the module layout is torchvision's, a state dict saved from the torchvision model loads
unchanged: ``load_pretrained(backbone, "/path/vgg16-397923af.pth")`` (or a safetensors file, or
any fsspec URI). Nothing is ever downloaded: ``pretrained_backbone`` is a path or URI the user
gives.

References:
- VGG: Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
  Recognition", ICLR 2015, arXiv:1409.1556.
- ResNet: He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
  arXiv:1512.03385; Table 1 gives the units per stage: ResNet-18 (2, 2, 2, 2) and ResNet-34
  (3, 4, 6, 3) of "basic" units (two 3×3 convs, stage widths 64/128/256/512), ResNet-50/101/152
  of bottleneck units (1×1, 3×3, 1×1, stage outputs 256/512/1024/2048). Module layout and
  parameter counts are torchvision's (``torchvision/models/resnet.py``: ``BasicBlock``,
  ``Bottleneck``, ``_make_layer``; ``resnet18`` 11,689,512 and ``resnet34`` 21,797,672 parameters
  with the 1000-class ``fc``).
- Dilated basic units: Yu, Koltun, Funkhouser, "Dilated Residual Networks", CVPR 2017,
  arXiv:1705.09914, §2 (both 3×3 convs of a basic unit at the stage's rate).
- Atrous ResNet and multi-grid: Chen et al., "Rethinking Atrous Convolution for Semantic Image
  Segmentation", arXiv:1706.05587, §3.2 (the unit rates of block4 multiply its base rate).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.models import vgg as tv_vgg

__all__ = [
    "RESNET_DEPTHS",
    "VGG16",
    "DilatedBasicBlock",
    "FeatureInfo",
    "ResNet",
    "build_resnet",
    "load_pretrained",
    "read_state_dict",
    "resnet_block",
]


@dataclass(frozen=True)
class FeatureInfo:
    """What one backbone output holds: its name, channel count and stride w.r.t. the input."""

    name: str
    channels: int
    stride: int


# --------------------------------------------------------------------------------------------
# Weights from a local path or URI (never the network unless the URI itself is remote storage
# the user named, e.g. s3://). Never unpickles: safetensors, or torch.load(weights_only=True).
# --------------------------------------------------------------------------------------------


def read_state_dict(uri: str) -> dict[str, Tensor]:
    """Read a state dict from a local path or fsspec URI (``.safetensors`` or a torch file).

    Torch files are loaded with ``weights_only=True``: nothing is unpickled. A checkpoint that
    wraps its weights (``{"state_dict": ...}`` or ``{"model": ...}``) is unwrapped.
    """
    import fsspec

    with fsspec.open(uri, "rb") as f:
        payload = f.read()
    if uri.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        return load_safetensors(payload)
    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{uri}: expected a state dict, found {type(state).__name__}")
    return state


def load_pretrained(module: nn.Module, uri: str, *, prefix: str = "") -> list[str]:
    """Load matching tensors from ``uri`` into ``module``; return the keys left untouched.

    Only keys that exist in ``module`` with the same shape are loaded (so a torchvision
    classifier's ``fc``/``classifier`` weights are skipped). ``prefix`` is stripped from the file's
    keys first. Raises ``ValueError`` if nothing at all matches: a wrong file must not pass
    silently.
    """
    state = read_state_dict(uri)
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    own = module.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ValueError(
            f"{uri}: no tensor matches {type(module).__name__} "
            f"(file has e.g. {sorted(state)[:3]}, module has e.g. {sorted(own)[:3]})"
        )
    module.load_state_dict(matched, strict=False)
    return sorted(set(own) - set(matched))


# --------------------------------------------------------------------------------------------
# VGG16
# --------------------------------------------------------------------------------------------

# Index of the five max-pool layers in torchvision's ``features`` Sequential.
_VGG16_POOLS = (4, 9, 16, 23, 30)
_VGG16_BN_POOLS = (6, 13, 23, 33, 43)
_VGG16_WIDTHS = (64, 128, 256, 512, 512)


def _init_vgg(features: nn.Module) -> None:
    """torchvision's VGG initialisation (``VGG._initialize_weights``): He-normal convolutions
    (fan-out), zero biases, unit BN. PyTorch's default conv init shrinks activations through the
    13 layers and stalls training from scratch."""
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class VGG16(nn.Module):
    """VGG16 configuration D (Simonyan & Zisserman, Table 1), 13 convolutions in five blocks.

    Keeps torchvision's ``features`` layout (so its weights load) and returns the output of each
    block after its pool: ``pool1`` … ``pool5``.

    Args:
        batch_norm: VGG16-BN (conv + BN + ReLU), as SegNet's encoder.
        first_padding: padding of conv1_1 (FCN pads by 100 so any input size aligns).
        ceil_mode: round pooled sizes up (Caffe's pooling; odd sizes keep their last row).
        return_indices: pools return argmax indices (SegNet's decoder unpools with them); the
            forward then also returns ``indices{i}`` and ``size{i}`` (the pre-pool size).
        dilate_last: DeepLab v1 (§3.1): pool4 and pool5 keep stride 1 (3×3, pad 1), and the conv5
            block is dilated by 2, giving output stride 8. DeepLab's pools are 3×3 stride 2 pad 1
            throughout.
        in_channels: input channels (3 for RGB; 1 for a grey scan).
    """

    def __init__(
        self,
        *,
        batch_norm: bool = False,
        first_padding: int = 1,
        ceil_mode: bool = False,
        return_indices: bool = False,
        dilate_last: bool = False,
        in_channels: int = 3,
        width_divisor: int = 1,
    ) -> None:
        super().__init__()
        cfg: list[int | str] = []
        for i, width in enumerate(_VGG16_WIDTHS):
            cfg += [width // width_divisor] * (2 if i < 2 else 3) + ["M"]
        self.features = tv_vgg.make_layers(cfg, batch_norm=batch_norm)
        pools = _VGG16_BN_POOLS if batch_norm else _VGG16_POOLS
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        if in_channels != 3 or first_padding != 1:
            old = convs[0]
            convs[0] = nn.Conv2d(in_channels, old.out_channels, 3, padding=first_padding)
            self.features[0] = convs[0]
        for idx in pools:
            if dilate_last:
                self.features[idx] = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=ceil_mode)
            else:
                self.features[idx] = nn.MaxPool2d(
                    2, stride=2, ceil_mode=ceil_mode, return_indices=return_indices
                )
        if dilate_last:
            for idx in pools[3:]:
                self.features[idx] = nn.MaxPool2d(3, stride=1, padding=1)
            for conv in convs[10:]:  # conv5_1..conv5_3
                conv.dilation, conv.padding = (2, 2), (2, 2)
        self.return_indices = return_indices and not dilate_last
        _init_vgg(self.features)
        self._stages = [0, *[p + 1 for p in pools]]  # slice bounds per block
        strides = (2, 4, 8, 8, 8) if dilate_last else (2, 4, 8, 16, 32)
        self.feature_info = [
            FeatureInfo(f"pool{i + 1}", w // width_divisor, s)
            for i, (w, s) in enumerate(zip(_VGG16_WIDTHS, strides))
        ]

    @property
    def out_channels(self) -> int:
        return self.feature_info[-1].channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for i in range(5):
            start, stop = self._stages[i], self._stages[i + 1]
            for layer in self.features[start : stop - 1]:
                x = layer(x)
            pool = self.features[stop - 1]
            if self.return_indices:
                out[f"size{i + 1}"] = x.shape[-2:]  # torch.Size: stays symbolic in an export
                x, indices = pool(x)
                out[f"indices{i + 1}"] = indices
            else:
                x = pool(x)
            out[f"pool{i + 1}"] = x  # (N, C_i, H/stride_i, W/stride_i)
        return out


# --------------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------------

# name -> units per stage (He et al., Table 1). "tiny" is one Bottleneck per stage at a quarter of
# the inner width: the same structure at a fraction of the cost, for CPU tests.
RESNET_DEPTHS: dict[str, tuple[int, int, int, int]] = {
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
    "resnet_tiny": (1, 1, 1, 1),
}

# The ResNets made of basic units (two 3×3 convs, expansion 1); all others use Bottleneck.
_BASIC_RESNETS = frozenset({"resnet18", "resnet34"})


class DilatedBasicBlock(tv_resnet.BasicBlock):
    """torchvision's ``BasicBlock`` (two 3×3 convs + identity) with atrous convolution.

    torchvision's ``BasicBlock`` refuses ``dilation > 1``; this one applies the rate to **both**
    3×3 convs, ``conv1`` and ``conv2`` (padding = rate, so the spatial size is kept), as the
    dilated basic units of Yu et al. (DRN, §2) do. Modules, their names (``conv1``, ``bn1``,
    ``conv2``, ``bn2``, ``downsample``) and the forward are torchvision's, so a torchvision
    ``resnet18`` / ``resnet34`` state dict loads unchanged. The constructor takes torchvision's
    block signature, so ``torchvision.models.resnet.ResNet`` builds stages of it.
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, 1, norm_layer)
        self.set_rate(dilation)

    def set_rate(self, rate: int) -> None:
        """Atrous rate of both 3×3 convs (``conv1`` and ``conv2``)."""
        for conv in (self.conv1, self.conv2):
            conv.dilation, conv.padding = (rate, rate), (rate, rate)


def resnet_block(name: str) -> type[DilatedBasicBlock] | type[tv_resnet.Bottleneck]:
    """The unit type of ResNet ``name``: ``DilatedBasicBlock`` (resnet18/34) or ``Bottleneck``."""
    if name not in RESNET_DEPTHS:
        raise ValueError(f"unknown ResNet {name!r}; choose one of {sorted(RESNET_DEPTHS)}")
    return DilatedBasicBlock if name in _BASIC_RESNETS else tv_resnet.Bottleneck


def _set_unit_rate(unit: nn.Module, rate: int) -> None:
    """Atrous rate of a unit's 3×3 conv(s): both convs of a basic unit, ``conv2`` of a
    Bottleneck (its only 3×3 conv)."""
    if isinstance(unit, DilatedBasicBlock):
        unit.set_rate(rate)
    else:
        unit.conv2.dilation, unit.conv2.padding = (rate, rate), (rate, rate)


class ResNet(nn.Module):
    """A torchvision ResNet cut into stem + layer1..layer4, with atrous strides.

    ``resnet18``/``resnet34`` are made of basic units (``DilatedBasicBlock``, stage outputs 64, 128,
    256, 512 channels), ``resnet50``/``101``/``152``/``resnet_tiny`` of Bottlenecks (256, 512, 1024,
    2048); ``feature_info`` reports which.

    Output stride 32 is the classification network; 16 dilates layer4 by 2; 8 dilates layer3 by 2
    and layer4 by 4 (DeepLab v2 §3.1, v3 §3.1). As in torchvision, the first unit of a dilated
    stage keeps the previous stage's rate. ``multi_grid`` sets the rates of layer4's units to
    ``base_rate * grid[i]`` (DeepLab v3 §3.2); the rate goes to every 3×3 conv of the unit (both
    convs of a basic unit, ``conv2`` of a Bottleneck). With fewer units than grid entries
    (resnet18's two) the leading entries are used: (1, 2, 4) gives rates (2, 4) at output stride
    16. The default ``(1, 1, 1)`` is the plain dilated network. ``deep_stem=True`` replaces the
    7×7 stem conv with three 3×3 convs (64, 64, 128), the stem of PSPNet's and ICNet's official
    ResNets (torchvision's stem weights then do not load).

    Returns ``layer1`` … ``layer4`` (strides 4, 8, and then 8/16/32 depending on output stride).
    """

    def __init__(
        self,
        name: str = "resnet101",
        *,
        output_stride: int = 32,
        multi_grid: Sequence[int] = (1, 1, 1),
        in_channels: int = 3,
        norm_layer: Callable[..., nn.Module] | None = None,
        deep_stem: bool = False,
    ) -> None:
        super().__init__()
        block = resnet_block(name)
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        dilate = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}
        width = 16 if name == "resnet_tiny" else 64
        net = tv_resnet.ResNet(
            block,
            list(RESNET_DEPTHS[name]),
            width_per_group=width,
            replace_stride_with_dilation=dilate[output_stride],
            norm_layer=norm_layer,
        )
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        if deep_stem:
            _use_deep_stem(net, in_channels, norm_layer or nn.BatchNorm2d)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        base_rate = {8: 4, 16: 2, 32: 1}[output_stride]
        if tuple(multi_grid) != (1, 1, 1) or output_stride != 32:
            self._set_layer4_rates(base_rate, tuple(multi_grid))
        s4 = {8: 8, 16: 16, 32: 32}[output_stride]
        s3 = {8: 8, 16: 16, 32: 16}[output_stride]
        c1, c2, c3, c4 = (planes * block.expansion for planes in (64, 128, 256, 512))
        self.feature_info = [
            FeatureInfo("layer1", c1, 4),
            FeatureInfo("layer2", c2, 8),
            FeatureInfo("layer3", c3, s3),
            FeatureInfo("layer4", c4, s4),
        ]
        self.output_stride = output_stride

    def _set_layer4_rates(self, base_rate: int, grid: tuple[int, ...]) -> None:
        blocks = list(self.layer4)
        if len(grid) != len(blocks) and len(blocks) > 0:
            # Fewer units than grid entries (resnet18, tiny ResNet): use the leading rates.
            grid = tuple(grid[i % len(grid)] for i in range(len(blocks)))
        for block, unit in zip(blocks, grid):
            _set_unit_rate(block, base_rate * unit)

    @property
    def out_channels(self) -> int:
        return self.feature_info[-1].channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        # C1..C4 = 64, 128, 256, 512 (basic units) or 256, 512, 1024, 2048 (Bottleneck).
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, 64, H/4, W/4)
        c1 = self.layer1(x)  # (N, C1, H/4, W/4)
        c2 = self.layer2(c1)  # (N, C2, H/8, W/8)
        c3 = self.layer3(c2)  # (N, C3, H/s3, W/s3)
        c4 = self.layer4(c3)  # (N, C4, H/os, W/os)
        return {"layer1": c1, "layer2": c2, "layer3": c3, "layer4": c4}


def _use_deep_stem(
    net: tv_resnet.ResNet, in_channels: int, norm_layer: Callable[..., nn.Module]
) -> None:
    """Replace the 7×7 stem conv with three 3×3 convs (64, 64, 128), in place.

    The "deep base" ResNet of PSPNet's and ICNet's official code (hszhao/PSPNet, ResNet-D stem of
    He et al., "Bag of Tricks", CVPR 2019): conv(stride 2) + BN + ReLU, conv + BN + ReLU, conv;
    ``bn1``/``relu``/``maxpool`` follow as before. layer1's first unit then reads 128 channels:
    a Bottleneck's first 1×1 conv and projection shortcut are widened to 128 inputs; a basic unit
    (64 channels out) gets a 3×3 ``conv1`` from 128 and a projection shortcut (1×1 conv + BN), the
    layout of the deep-stem ResNet-18/34 in hszhao/semseg (``model/resnet.py``).
    """

    def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)

    net.conv1 = nn.Sequential(
        conv3x3(in_channels, 64, stride=2),  # (N, 64, H/2, W/2)
        norm_layer(64),
        nn.ReLU(inplace=True),
        conv3x3(64, 64),
        norm_layer(64),
        nn.ReLU(inplace=True),
        conv3x3(64, 128),  # (N, 128, H/2, W/2)
    )
    net.bn1 = norm_layer(128)
    first = net.layer1[0]
    if isinstance(first, DilatedBasicBlock):
        width = first.conv1.out_channels
        first.conv1 = nn.Conv2d(128, width, 3, padding=1, bias=False)
        first.downsample = nn.Sequential(
            nn.Conv2d(128, width, 1, bias=False), norm_layer(width)
        )  # (N, 64, H/4, W/4) shortcut
        return
    first.conv1 = nn.Conv2d(128, first.conv1.out_channels, 1, bias=False)
    if first.downsample is not None:
        first.downsample[0] = nn.Conv2d(128, first.downsample[0].out_channels, 1, bias=False)


def build_resnet(
    name: str,
    *,
    output_stride: int = 32,
    multi_grid: Sequence[int] = (1, 1, 1),
    in_channels: int = 3,
    pretrained: str | None = None,
) -> ResNet:
    """A ResNet backbone; ``pretrained`` is a local path or URI of a torchvision state dict."""
    net = ResNet(name, output_stride=output_stride, multi_grid=multi_grid, in_channels=in_channels)
    if pretrained:
        load_pretrained(net, pretrained)
    return net
