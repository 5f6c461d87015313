"""Benchmark results files: the JSON beside each table is valid JSON, an unmeasured value is null."""

from __future__ import annotations

import json
import math

from tokensparse.bench import BenchResult, BenchRow, write_results


def test_write_results_writes_null_for_a_value_not_measured(tmp_path):
    rows = [
        BenchRow("dense", "-", 4.6, 10.0, 1.0),
        BenchRow("authors' code", "keep_ratio=0.7", math.nan, 15.0, 1.5, bound_speedup=1.6),
    ]
    result = BenchResult("deit_small", 32, "cpu", "float32", 3, "machine", "2026-12-03", rows)
    write_results(tmp_path, "stem", "title", "python bench.py", [result], "notes")
    text = (tmp_path / "stem.json").read_text()
    assert "NaN" not in text

    def reject(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    saved = json.loads(text, parse_constant=reject)
    authors = saved["results"][0]["rows"][1]
    assert authors["gflops"] is None and authors["speedup"] == 1.5
    assert "| authors' code |" in (tmp_path / "stem.md").read_text()
