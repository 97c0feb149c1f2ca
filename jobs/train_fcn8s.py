"""Train FCN-8s (Long, Shelhamer, Darrell, CVPR 2015) on Ray Train.

Paper recipe (arXiv:1411.4038 §4.3):
- SGD, momentum 0.9, weight decay 5e-4, minibatch of 20 images, fixed learning rate 1e-4
  (FCN-VGG16, §4.3), whole images (no crop, no scale augmentation: "no noticeable improvement"),
  random mirroring; PASCAL VOC 2011 train + SBD.

Two recipes: the paper's (above) fine-tunes a pretrained backbone and runs when
``--pretrained-backbone URI`` is given; otherwise the from-scratch recipe runs (``from_scratch``:
AdamW lr 1e-3 for a total batch of 8, weight decay 0.01, poly decay, gradient clipping at 1, the
paper's crops and schedule), since the paper's learning rates barely move random weights.

Scaled to the cluster: ``batch_size`` is per worker; the paper's learning rate is scaled linearly
from its total batch of 20 to ``batch_size × workers × grad_accum`` (``--lr`` overrides it).

Deviations: the paper trains FCN-16s/8s in stages from the coarser net with a 100× lower
rate; each job here trains from the backbone with the FCN-32s rate. Biases do not get the doubled
learning rate. Images are cropped/padded to 512×512 so a batch stacks (VOC images are ≤ 500 px).
The paper gives no iteration count for VOC: 50 epochs.

The values live in ``segplatform.train.recipes`` with every other entry point's;
``--show-recipe`` prints the resolved run, each value with where it came from.

Usage:
    ray job submit --working-dir . -- python jobs/train_fcn8s.py --data s3://bucket/dataset \
        --workers 8 --gpu --storage s3://bucket/runs --mlflow-uri http://mlflow:5000
    python jobs/train_fcn8s.py --data ./data/mni152-tissue --tiny --workers 2
"""

from __future__ import annotations

import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this file from the working directory: make the project
# importable even where it is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segplatform.train.cli_args import job_main

if __name__ == "__main__":
    sys.exit(job_main("fcn8s"))
