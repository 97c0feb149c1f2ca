"""Train ICNet (Zhao, Qi, Shen, Shi, Jia, ECCV 2018) on Ray Train.

Paper recipe (arXiv:1704.08545 §5):
- "poly" learning rate from 0.01 (power 0.9), momentum 0.9, weight decay 1e-4, batch 16,
  30K iterations on Cityscapes, cascade label guidance with loss weights 0.4 (1/16), 0.4 (1/8) and
  1 (1/4; the model's loss_weights), labels downsampled to each output's resolution.

Two recipes: the paper's (above) fine-tunes a pretrained backbone and runs when
``--pretrained-backbone URI`` is given; otherwise the from-scratch recipe runs (``from_scratch``:
AdamW lr 1e-3 for a total batch of 8, weight decay 0.01, poly decay, gradient clipping at 1, the
paper's crops and schedule), since the paper's learning rates barely move random weights.

Scaled to the cluster: ``batch_size`` is per worker; the paper's learning rate is scaled linearly
from its total batch of 16 to ``batch_size × workers × grad_accum`` (``--lr`` overrides it).

Deviations: the crop size (800×800) is an assumption (the paper trains on Cityscapes' 1024×2048
frames); random scaling 0.5-2.0 as in PSPNet, whose recipe ICNet follows.

The values live in ``segplatform.train.recipes`` with every other entry point's;
``--show-recipe`` prints the resolved run, each value with where it came from.

Usage:
    ray job submit --working-dir . -- python jobs/train_icnet.py --data s3://bucket/dataset \
        --workers 8 --gpu --storage s3://bucket/runs --mlflow-uri http://mlflow:5000
    python jobs/train_icnet.py --data ./data/mni152-tissue --tiny --workers 2
"""

from __future__ import annotations

import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this file from the working directory: make the project
# importable even where it is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segplatform.train.cli_args import job_main

if __name__ == "__main__":
    sys.exit(job_main("icnet"))
