"""Distributed training on Ray Train: config, recipes, transforms, losses, worker loop, driver.

    from segplatform.train import recipe_config, run
    result = run(recipe_config("unet", data="s3://bucket/voc", num_workers=8))

``recipe_config`` resolves a run as ``segplatform train`` and the job scripts do (the
architecture's recipe, then the given fields, the learning rate scaled to the total batch);
``TrainConfig(...)`` is the literal config, without a recipe.

Importing this package is light: Ray and the models load when ``run`` is called.
"""

from __future__ import annotations

from segplatform.train.config import TrainConfig
from segplatform.train.recipes import recipe_config
from segplatform.train.run import run

__all__ = ["TrainConfig", "recipe_config", "run"]
