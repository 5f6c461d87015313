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

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- test: runs as written -->"


EXCERPT = re.compile(r"<!-- excerpt of (\S+) -->\n```python\n(.*?)```", re.S)


def blocks() -> list[tuple[str, str, bool]]:
    """(language, code, runs) of every python/bash block, in order; `runs`: marked to run as written.
    An excerpt of a file (marked `<!-- excerpt of PATH -->`) is no block to run: `test_excerpts_are_the_files`."""
    text = EXCERPT.sub("", (ROOT / "README.md").read_text())
    found = re.finditer(r"(" + re.escape(MARK) + r"\n)?```(python|bash)\n(.*?)```", text, re.S)
    return [(m.group(2), m.group(3), bool(m.group(1))) for m in found]


def test_excerpts_are_the_files():
    """Every line of an excerpt is a line of the file it quotes (so the README cannot drift from it)."""
    excerpts = EXCERPT.findall((ROOT / "README.md").read_text())
    assert excerpts
    for path, code in excerpts:
        lines = {line.strip() for line in (ROOT / path).read_text().splitlines()}
        missing = [line for line in code.splitlines() if line.strip() and line.strip() not in lines]
        assert not missing, f"README's excerpt of {path} has lines the file lacks: {missing}"


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


@pytest.fixture
def registry_restored():
    """The methods a test adds (the README's `export TOKENSPARSE_METHODS=...`) leave the registry after it."""
    from tokensparse.policies.registry import method_names, unregister_method

    before, modules = method_names(), set(sys.modules)
    yield
    for name in method_names():
        if name not in before:
            unregister_method(name)
    for name in set(sys.modules) - modules:  # a file TOKENSPARSE_METHODS named imports afresh next time
        if name.startswith("tokensparse_methods_"):
            del sys.modules[name]


def test_every_readme_block_runs_as_written(tmp_path, monkeypatch, registry_restored):
    from tokensparse.cli import build_parser, main
    from tokensparse.policies.registry import import_methods

    (tmp_path / "examples").symlink_to(ROOT / "examples")
    added = []
    monkeypatch.chdir(tmp_path)
    python = []
    for lang, code, runs in blocks():
        if lang == "python":
            python.append(code)
            continue
        for words in commands(code):
            if words[0] == "make":
                continue
            if words[0] == "export":  # TOKENSPARSE_METHODS: the methods it names join the registry
                name, _, value = words[1].partition("=")
                assert name == "TOKENSPARSE_METHODS", words
                import_methods(value)
                added.append(value)
                continue
            if words[0] == "python":  # a script of this repository
                assert (ROOT / words[1]).is_file(), words
                continue
            argv = cli_args(words)
            assert argv is not None, f"not a tokensparse command: {words}"
            if runs:  # as the shell would run it: the same arguments, through the CLI's entry point
                assert main(argv) == 0, f"{shlex.join(words)} failed"
            else:
                try:
                    build_parser().parse_args(argv)  # an unknown or malformed option exits here
                except SystemExit as exit:
                    assert exit.code == 0 and "--help" in argv, f"{shlex.join(words)} does not parse"
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
    assert added, "the README's Adding a method names TOKENSPARSE_METHODS"
    assert done.returncode == 0, f"a README block failed:\n{done.stderr[-3000:]}"
