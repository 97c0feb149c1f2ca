"""Preset search spaces, one per architecture family, named after the architecture.

Each is the data form of a space (``segplatform.tune.space``), the same as a YAML/JSON file:
``segplatform sweep --arch pspnet --space pspnet`` and ``--space my_space.yaml`` read alike, and
``segplatform sweep --arch NAME --show-space`` prints a preset to start a file from.

What each varies, and where the candidates come from:

- DeepLab v2 (Chen et al., "DeepLab: Semantic Image Segmentation with Deep Convolutional Nets,
  Atrous Convolution, and Fully Connected CRFs", TPAMI 2017, arXiv:1606.00915, §3.3 and
  Table 3): ASPP-S rates (2, 4, 8, 12) against ASPP-L (6, 12, 18, 24); output stride 8 (the
  paper's) or 16.
- DeepLab v3 (Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation",
  arXiv:1706.05587, §3.2-§3.3, §4.1): ASPP rates (6, 12, 18) at output stride 16 (the config
  doubles them at stride 8, as the paper does), a smaller and a larger set around them; output
  stride 8 or 16; multi-grid unit rates of block4 as the paper varies them (1, 1, 1), (1, 2, 1),
  (1, 2, 4) and (2, 2, 2).
- PSPNet (Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017, arXiv:1612.01105, Table 1
  and Table 2): pyramid bins B1 (1) against B1236 (1, 2, 3, 6), plus (1, 2, 4, 8); the
  auxiliary loss weight from 0.2 to 1.0 around the paper's choice of 0.4.
- ICNet (Zhao et al., "ICNet for Real-Time Semantic Segmentation on High-Resolution Images",
  ECCV 2018, arXiv:1704.08545, §3): the same pyramid pooling bins on the low-resolution branch.
- RefineNet (Lin et al., "RefineNet: Multi-Path Refinement Networks for High-Resolution Semantic
  Segmentation", CVPR 2017, arXiv:1611.06612, §3.2, Fig. 2d): 1-4 chained residual pooling
  stages (its released code uses 2, with 4 as the alternative; our default is 4).

Common to all: the learning rate log-uniform over two decades around the from-scratch recipe's
1e-3 (``segplatform.train.recipes.SCRATCH``), and the weight decay log-uniform. Crop size,
batch size and auxiliary weights are tunable too (``crop_size``, ``batch_size``,
``aux_weight``/``aux_weights``); the presets leave them fixed because they change a trial's cost.
"""

from __future__ import annotations

from typing import Any

__all__ = ["COMMON", "PRESETS"]

COMMON: dict[str, Any] = {
    "lr": {"loguniform": [1.0e-4, 1.0e-2]},
    "weight_decay": {"loguniform": [1.0e-5, 1.0e-2]},
}

PRESETS: dict[str, dict[str, Any]] = {
    "deeplab_v2": {
        "arch": "deeplab_v2",
        "description": "DeepLab v2: ASPP-S vs ASPP-L rates, output stride, learning rate",
        "params": {
            "atrous_rates": {"choice": [[6, 12, 18, 24], [2, 4, 8, 12], [3, 6, 9, 12]]},
            "output_stride": {"choice": [8, 16]},
            **COMMON,
        },
    },
    "deeplab_v3": {
        "arch": "deeplab_v3",
        "description": "DeepLab v3: ASPP rates, output stride, multi-grid, learning rate",
        "params": {
            "atrous_rates": {"choice": [[6, 12, 18], [3, 6, 9], [12, 24, 36]]},
            "output_stride": {"choice": [8, 16]},
            "multi_grid": {"choice": [[1, 1, 1], [1, 2, 1], [1, 2, 4], [2, 2, 2]]},
            **COMMON,
        },
    },
    "pspnet": {
        "arch": "pspnet",
        "description": "PSPNet: pyramid bins, auxiliary loss weight, learning rate",
        "params": {
            "bins": {"choice": [[1], [1, 2, 3, 6], [1, 2, 4, 8]]},
            "aux_weight": {"choice": [0.2, 0.4, 0.6, 1.0]},
            **COMMON,
        },
    },
    "icnet": {
        "arch": "icnet",
        "description": "ICNet: pyramid bins of the low-resolution branch, learning rate",
        "params": {
            "bins": {"choice": [[1], [1, 2, 3, 6], [1, 2, 4, 8]]},
            **COMMON,
        },
    },
    "refinenet": {
        "arch": "refinenet",
        "description": "RefineNet: chained residual pooling stages, learning rate",
        "params": {
            "crp_stages": {"choice": [1, 2, 3, 4]},
            **COMMON,
        },
    },
}
