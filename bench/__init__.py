"""Benchmark harnesses, run from a checkout: ``python -m bench.ops`` (exponential and application),
``python -m bench.accuracy`` (``skew_expm`` accuracy table), ``python -m bench.step`` (training step per encoding)."""
