"""Train Mask R-CNN (He, Gkioxari, Dollár, Girshick, ICCV 2017) on Ray Train.

Paper recipe (arXiv:1703.06870 §3.1):
- SGD, learning rate 0.02, momentum 0.9, weight decay 1e-4, 16 images per minibatch
  (2 per GPU), 160K iterations with the rate divided by 10 at 120K, linear warmup (Detectron),
  horizontal flips; the model resizes images itself (shorter side 800).

Two recipes: the paper's (above) fine-tunes a pretrained backbone and runs when
``--pretrained-backbone URI`` is given; otherwise the from-scratch recipe runs (``from_scratch``:
AdamW lr 1e-3 for a total batch of 8, weight decay 0.01, poly decay, gradient clipping at 1, the
paper's crops and schedule), since the paper's learning rates barely move random weights.

Scaled to the cluster: ``batch_size`` is per worker; the paper's learning rate is scaled linearly
from its total batch of 16 to ``batch_size × workers × grad_accum`` (``--lr`` overrides it).

Deviations: the step decay is replaced by the poly schedule; images are padded/cropped to
800×800 so that a batch stacks; instances come from the dataset's instance map or connected
components of its mask (segplatform.detection.targets_from_masks).

The values live in ``segplatform.train.recipes`` with every other entry point's;
``--show-recipe`` prints the resolved run, each value with where it came from.

Usage:
    ray job submit --working-dir . -- python jobs/train_mask_rcnn.py --data s3://bucket/dataset \
        --workers 8 --gpu --storage s3://bucket/runs --mlflow-uri http://mlflow:5000
    python jobs/train_mask_rcnn.py --data ./data/mni152-tissue --tiny --workers 2
"""

from __future__ import annotations

import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this file from the working directory: make the project
# importable even where it is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segplatform.train.cli_args import job_main

if __name__ == "__main__":
    sys.exit(job_main("mask_rcnn"))
