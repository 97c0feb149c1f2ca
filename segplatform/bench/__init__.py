"""Benchmarks: measured side by side in one run, never asserted as timings in tests.

- ``segplatform.bench.learn``: learning parity of the training service with a plain PyTorch
  loop (``segplatform bench learn``).
"""
