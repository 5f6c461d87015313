"""The README's usage example runs as written and prints what its comments say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_usage_example_runs_as_written():
    text = README.read_text()
    code = re.search(r"## Quick start\n\n```python\n(.*?)```", text, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})
    printed = out.getvalue().splitlines()
    promised = [
        line.split("# ", 1)[1].split(" (")[0].strip()
        for line in code.splitlines()
        if line.startswith("print(")
    ]
    assert len(printed) == len(promised) == 2
    for got, want in zip(printed, promised):
        assert got.startswith(want.split(" GFLOPs")[0]), (got, want)
