"""A fresh user copies the README top to bottom: the shell blocks marked `<!-- test: runs as written -->`
run as written (through the CLI's entry point), every other `tokensparse` command in the README parses
(its scripts exist), and every Python block runs as written, each on its own namespace, in one folder."""

from __future__ import annotations

import json
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


def test_every_readme_block_runs_as_written(tmp_path, monkeypatch):
    from tokensparse.cli import build_parser, main

    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    python = []
    for lang, code, runs in blocks():
        if lang == "python":
            python.append(code)
            continue
        for words in commands(code):
            if words[0] == "make":
                continue
            if words[0] == "python":  # a script of this repository
                assert (ROOT / words[1]).is_file(), words
                continue
            argv = cli_args(words)
            assert argv is not None, f"not a tokensparse command: {words}"
            if runs:  # as the shell would run it: the same arguments, through the CLI's entry point
                assert main(argv) == 0, f"{shlex.join(words)} failed"
            else:
                build_parser().parse_args(argv)  # an unknown or malformed option exits here
    # the Python blocks after the shell ones (a block reads the run the walkthrough trained), in README
    # order, each in a fresh namespace of one new interpreter: a block does not lean on another's names
    (tmp_path / "blocks.json").write_text(json.dumps(python))
    runner = (
        "import json\n"
        "for i, code in enumerate(json.load(open('blocks.json'))):\n"
        "    exec(compile(code, f'README python block {i + 1}', 'exec'), {'__name__': '__main__'})\n"
    )
    env = os.environ | {"OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-c", runner], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"a README block failed:\n{done.stderr[-3000:]}"
