"""A fresh user copies the README top to bottom: every Python block runs as written (each on its own, in
order, in one folder), the shell blocks marked `<!-- test: runs as written -->` run as written, and
every other `tokensparse` command in the README parses (its files exist)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- test: runs as written -->"


def blocks() -> list[tuple[str, str, bool]]:
    """(language, code, runs) of every python/bash block, in order; `runs`: marked to run as written."""
    text = (ROOT / "README.md").read_text()
    found = re.finditer(r"(" + re.escape(MARK) + r"\n)?```(python|bash)\n(.*?)```", text, re.S)
    return [(m.group(2), m.group(3), bool(m.group(1))) for m in found]


def commands(code: str) -> list[list[str]]:
    return [words for line in code.splitlines() if (words := shlex.split(line, comments=True))]


def cli_args(words: list[str]) -> list[str] | None:
    """The `tokensparse` arguments of a shell line (None: not a tokensparse command)."""
    if words[0] == "tokensparse":
        return words[1:]
    if words[0] == "torchrun":
        return words[words.index("tokensparse") + 1 :]
    return None


def test_the_readme_has_blocks_to_run():
    kinds = [(lang, runs) for lang, _, runs in blocks()]
    assert kinds.count(("python", False)) >= 6 and ("bash", True) in kinds


def test_every_readme_block_runs_as_written(tmp_path):
    from tokensparse.cli import build_parser

    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = os.environ | {"OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT / "src")}
    for lang, code, runs in blocks():
        if lang == "python":
            done = subprocess.run(
                [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
            )
            assert done.returncode == 0, f"README block failed:\n{code}\n{done.stderr[-3000:]}"
            continue
        for words in commands(code):
            if words[0] == "make":
                continue
            if words[0] == "python":  # a script of this repository
                assert (ROOT / words[1]).is_file(), words
                continue
            argv = cli_args(words)
            assert argv is not None, f"not a tokensparse command: {words}"
            if runs:
                cmd = [sys.executable, "-m", "tokensparse", *argv]
                done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
                assert done.returncode == 0, f"{shlex.join(words)} failed:\n{done.stderr[-3000:]}"
            else:
                build_parser().parse_args(argv)  # an unknown or malformed option exits here
