"""Train DeepLab v1 (Chen et al., ICLR 2015) on Ray Train.

Paper recipe (arXiv:1412.7062 §4.1):
- SGD, minibatch of 20 images, initial learning rate 0.001 (0.01 for the final classifier),
  multiplied by 0.1 every 2000 iterations, momentum 0.9, weight decay 5e-4, 6000 iterations,
  306×306 crops.

Two recipes: the paper's (above) fine-tunes a pretrained backbone and runs when
``--pretrained-backbone URI`` is given; otherwise the from-scratch recipe runs (``from_scratch``:
AdamW lr 1e-3 for a total batch of 8, weight decay 0.01, poly decay, gradient clipping at 1, the
paper's crops and schedule), since the paper's learning rates barely move random weights.

Scaled to the cluster: ``batch_size`` is per worker; the paper's learning rate is scaled linearly
from its total batch of 20 to ``batch_size × workers × grad_accum`` (``--lr`` overrides it).

Deviations: the step schedule is replaced by the poly schedule (power 0.9) used from DeepLab v2
on; the classifier's 10× rate applies to every non-backbone parameter (head_lr_mult).

The values live in ``segplatform.train.recipes`` with every other entry point's;
``--show-recipe`` prints the resolved run, each value with where it came from.

Usage:
    ray job submit --working-dir . -- python jobs/train_deeplab_v1.py --data s3://bucket/dataset \
        --workers 8 --gpu --storage s3://bucket/runs --mlflow-uri http://mlflow:5000
    python jobs/train_deeplab_v1.py --data ./data/mni152-tissue --tiny --workers 2
"""

from __future__ import annotations

import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this file from the working directory: make the project
# importable even where it is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segplatform.train.cli_args import job_main

if __name__ == "__main__":
    sys.exit(job_main("deeplab_v1"))
