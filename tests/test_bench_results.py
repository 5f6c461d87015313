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


def test_benchmarks_leave_the_committed_results_alone_unless_asked():
    """Run as written, a benchmark writes under runs/bench/; only --update-results reaches benchmarks/results."""
    import argparse
    import re
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        from results_dir import COMMITTED, SCRATCH, add_update_flag, results_folder
    finally:
        sys.path.remove(str(bench))
    parser = argparse.ArgumentParser()
    add_update_flag(parser)
    assert COMMITTED == bench / "results"
    assert results_folder(parser.parse_args(["--update-results"])) == COMMITTED
    writers = [p for p in bench.glob("*.py") if p.name != "results_dir.py" and "results" in p.read_text()]
    for script in writers:
        text = script.read_text()
        # no output path into the committed folder except through results_folder (inputs may read it)
        assert not re.search(r'default=Path\(__file__\)\.parent / "results" / ', text), script.name
        if re.search(r"write_results\(|\.write_text\(", text):
            assert "results_folder(args)" in text, script.name
    assert SCRATCH == Path("runs") / "bench"
