"""The GPU suite's smoke run (CPU, seconds): it runs, and writes a results table naming every contender,
the bound and the device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_suite_smoke_run_writes_its_table(tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke"], cwd=tmp_path,
                          env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "runs" / "bench" / "gpu_suite_smoke.json").read_text())
    assert [c["batch"] for c in record["cases"]] == [1, 4]
    labels = set(record["cases"][0]["rows"])
    assert {"dense", "DynamicViT 0.7", "EViT 0.7", "ToMe r=1", "A-ViT (centre 3)"} <= labels
    assert any(label.startswith("truncation bound") for label in labels)
    dvit = record["cases"][0]["rows"]["DynamicViT 0.7"]
    assert dvit["speedup"] > 0 and dvit["share_of_bound"] > 0
    table = (tmp_path / "runs" / "bench" / "gpu_suite_smoke.md").read_text()
    assert (
        "- machine:" in table and "| deit_tiny_patch16_224 | float32 | 4 | eager | DynamicViT 0.7 |" in table
    )
