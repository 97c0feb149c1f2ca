"""Sweep DeepLab v3's atrous rates × output stride × learning rate with Ray Tune.

The knobs of Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation"
(arXiv:1706.05587): the ASPP rates (§3.3; (6, 12, 18) at output stride 16, doubled by the model
at stride 8) and the output stride (§3.1, Table 1: 8 is denser and costlier than 16), with the
learning rate log-uniform around the recipe's. Every trial is one run of
``jobs/train_deeplab_v3.py``'s recipe (from scratch, or the paper's with
``--pretrained-backbone``) with the sampled values; ASHA stops poor trials at their early
evaluations, and ``--register-as`` registers the best trial's best checkpoint. The space is
the deeplab_v3 preset of ``segplatform.tune.presets`` (with multi-grid and weight
decay), where every sweep of DeepLab v3 reads it; ``--space FILE`` replaces it.

Usage:
    ray job submit --working-dir . -- python jobs/sweep_deeplab_v3.py \
        --data s3://bucket/dataset --storage s3://bucket/runs --workers 4 --gpu --trials 16 \
        --max-iters 30000 --eval-every 2000 --register-as deeplab-v3
    python jobs/sweep_deeplab_v3.py --data ./data/mni152-tissue --tiny --trials 4 \
        --max-iters 8 --eval-every 2
    python jobs/sweep_deeplab_v3.py --show-space     # the space, to start a file from
"""

from __future__ import annotations

import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this file from the working directory: make the project
# importable even where it is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segplatform.tune.cli import sweep_main

if __name__ == "__main__":
    sys.exit(sweep_main(prog="jobs/sweep_deeplab_v3.py", arch="deeplab_v3"))
