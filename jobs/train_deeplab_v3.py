"""Train DeepLab v3 (Chen, Papandreou, Schroff, Adam, arXiv 2017) on Ray Train.

Paper recipe (arXiv:1706.05587 §4):
- "poly" learning rate from 0.007 (power 0.9), crop 513×513, batch 16, output stride 16,
  30K iterations on the augmented VOC train set, random scaling 0.5-2.0 and left-right flips,
  batch norm trained (decay 0.9997).

Two recipes: the paper's (above) fine-tunes a pretrained backbone and runs when
``--pretrained-backbone URI`` is given; otherwise the from-scratch recipe runs (``from_scratch``:
AdamW lr 1e-3 for a total batch of 8, weight decay 0.01, poly decay, gradient clipping at 1, the
paper's crops and schedule), since the paper's learning rates barely move random weights.

Scaled to the cluster: ``batch_size`` is per worker; the paper's learning rate is scaled linearly
from its total batch of 16 to ``batch_size × workers × grad_accum`` (``--lr`` overrides it).

Deviations: weight decay 1e-4 and momentum 0.9 are the official code's defaults; the second
stage (output stride 8, frozen batch norm) is a separate run with --arch-param output_stride=8.

The values live in ``segplatform.train.recipes`` with every other entry point's;
``--show-recipe`` prints the resolved run, each value with where it came from.

Usage:
    ray job submit --working-dir . -- python jobs/train_deeplab_v3.py --data s3://bucket/dataset \
        --workers 8 --gpu --storage s3://bucket/runs --mlflow-uri http://mlflow:5000
    python jobs/train_deeplab_v3.py --data ./data/mni152-tissue --tiny --workers 2
"""

from __future__ import annotations

import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this file from the working directory: make the project
# importable even where it is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segplatform.train.cli_args import job_main

if __name__ == "__main__":
    sys.exit(job_main("deeplab_v3"))
