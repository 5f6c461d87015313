"""Paired, interleaved throughput measurement.

All contenders run in one process on the same input; each round times every contender once, in a
rotating order, so drifts of the machine (clock, other load) hit them alike. We report medians and
ratios against the dense model and against the truncation bound: the same dense timm blocks fed
pre-sliced token counts, i.e. pruning with zero overhead.

`timing` measures, `results` tabulates and writes, `suites` holds the benchmarks; every name is
importable from here.
"""

from __future__ import annotations

from .results import BenchResult, BenchRow, _result, busy_warnings, write_results  # noqa: F401
from .results import _result as make_result
from .suites import _gflops, _time_all, bench_avit, bench_dynamicvit, bench_method, make_policy  # noqa: F401
from .suites import _gflops as executed_gflops
from .suites import _time_all as time_contenders
from .timing import (  # noqa: F401
    DTYPES,
    Timing,
    interleaved,
    machine_description,
    mixed_batch,
    predictor_bound_forward,
    today,
    truncated_forward,
)

__all__ = [
    "BenchResult",
    "BenchRow",
    "DTYPES",
    "Timing",
    "bench_avit",
    "bench_dynamicvit",
    "bench_method",
    "executed_gflops",
    "make_result",
    "time_contenders",
    "busy_warnings",
    "interleaved",
    "machine_description",
    "make_policy",
    "mixed_batch",
    "predictor_bound_forward",
    "today",
    "truncated_forward",
    "write_results",
]
