"""Distributed training on Ray Train: config, transforms, losses, worker loop, driver.

    from segplatform.train import TrainConfig, run
    result = run(TrainConfig(arch="unet", data="s3://bucket/voc", max_iters=20_000, num_workers=8))

Importing this package is light: Ray and the models load when ``run`` is called.
"""

from __future__ import annotations

from segplatform.train.config import TrainConfig
from segplatform.train.run import run

__all__ = ["TrainConfig", "run"]
