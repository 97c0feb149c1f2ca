"""Hyperparameter sweeps on Ray Tune: every trial is one training run.

    from segplatform.train import TrainConfig
    from segplatform.tune import SweepConfig, load_space, run_sweep

    base = TrainConfig(arch="deeplab_v3", data="s3://bucket/voc", max_iters=4000, eval_every=500)
    result = run_sweep(SweepConfig(base, load_space("deeplab_v3", "deeplab_v3"), name="voc-1"))

- ``space``: search spaces as data (JSON/YAML files, ``presets``), checked against the
  architecture before anything starts.
- ``trial``: the Tune trainable: one ``segplatform.train.run`` per trial, evaluations reported.
- ``schedulers``: ASHA (default), PBT, none.
- ``sweep``: the driver: checks, concurrency, MLflow parent, Tuner or restore, results,
  registration of the winner.
- ``records``, ``report``: MLflow bookkeeping; results table and figure.
- ``cli``: ``segplatform sweep`` and ``jobs/sweep_<arch>.py``.

Importing this package is light: Ray loads when a sweep runs.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SweepConfig", "load_space", "run_sweep"]


def __getattr__(name: str) -> Any:
    if name in ("SweepConfig", "run_sweep"):
        from segplatform.tune import sweep

        return getattr(sweep, name)
    if name == "load_space":
        from segplatform.tune.space import load_space

        return load_space
    raise AttributeError(name)
