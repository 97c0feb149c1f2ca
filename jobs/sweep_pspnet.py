"""Sweep PSPNet's pyramid bins × auxiliary loss weight × learning rate with Ray Tune.

The knobs of Zhao et al., "Pyramid Scene Parsing Network" (CVPR 2017, arXiv:1612.01105): the
pyramid pooling bins (Table 1: B1 = (1) against B1236 = (1, 2, 3, 6)) and the weight of the
auxiliary loss on layer3 (Table 2; 0.4 in the paper), with the learning rate log-uniform around
the recipe's. Every trial is one run of the recipe ``jobs/train_pspnet.py`` resolves (from
scratch, or the paper's with ``--pretrained-backbone``) with the sampled values; ASHA stops poor
trials at their early evaluations, and ``--register-as`` registers the best trial's best
checkpoint. The space is the pspnet preset of ``segplatform.tune.presets``, where every sweep of
PSPNet reads it; ``--space FILE`` replaces it.

Usage:
    ray job submit --working-dir . -- python jobs/sweep_pspnet.py \
        --data s3://bucket/dataset --storage s3://bucket/runs --workers 4 --gpu --trials 16 \
        --max-iters 30000 --eval-every 2000 --register-as pspnet
    python jobs/sweep_pspnet.py --data ./data/mni152-tissue --tiny --trials 4 \
        --max-iters 8 --eval-every 2
    python jobs/sweep_pspnet.py --show-space     # the space, to start a file from
"""

from __future__ import annotations

import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this file from the working directory: make the project
# importable even where it is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segplatform.tune.cli import sweep_main

if __name__ == "__main__":
    sys.exit(sweep_main(prog="jobs/sweep_pspnet.py", arch="pspnet"))
