"""Train U-Net (Ronneberger, Fischer, Brox, MICCAI 2015) on Ray Train.

Paper recipe (arXiv:1505.04597 §3):
- SGD with momentum 0.99, one large tile per step (batch 1), cross-entropy weighted by the
  border weight map of eq. 2 (w0 = 10, sigma = 5 pixels), shifts, rotations and elastic
  deformations as augmentation.

Two recipes. U-Net has no pretrained backbone: the default is the from-scratch recipe
(``from_scratch``: AdamW lr 1e-3 for a total batch of 8, weight decay 0.01, poly decay, gradient
clipping at 1, plain cross-entropy), which converges at the batch sizes a cluster uses; the
paper's (above) runs with ``--recipe paper``. Its momentum 0.99 was tuned for one tile per step:
at a total batch of 8 its linearly scaled lr (0.08) diverges.

Scaled to the cluster: ``batch_size`` is per worker; the paper's learning rate is scaled linearly
from its total batch of 1 to ``batch_size × workers × grad_accum`` (``--lr`` overrides it).

Deviations: the learning rate (0.01, fixed) is not stated in the paper; elastic deformations
and rotations are not implemented (random scale 0.8-1.2, crop and flip instead); w_c of eq. 2 is 1.

The values live in ``segplatform.train.recipes`` with every other entry point's;
``--show-recipe`` prints the resolved run, each value with where it came from.

Usage:
    ray job submit --working-dir . -- python jobs/train_unet.py --data s3://bucket/dataset \
        --workers 8 --gpu --storage s3://bucket/runs --mlflow-uri http://mlflow:5000
    python jobs/train_unet.py --data ./data/mni152-tissue --tiny --workers 2
"""

from __future__ import annotations

import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this file from the working directory: make the project
# importable even where it is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segplatform.train.cli_args import job_main

if __name__ == "__main__":
    sys.exit(job_main("unet"))
