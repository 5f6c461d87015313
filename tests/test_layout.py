"""The package's import graph: the policies count their own work from a leaf module, so
`tokensparse.flops`, which dispatches to them, and they do not import each other in a cycle."""

from __future__ import annotations

import subprocess
import sys


def test_the_policies_do_not_import_the_flop_counter():
    code = (
        "import sys\n"
        "import tokensparse.policies.dynamicvit, tokensparse.policies.baselines, tokensparse.policies.dynconvnext, "
        "tokensparse.policies.dynswin, tokensparse.policies.dynspatial, tokensparse.policies.tome, "
        "tokensparse.policies.evit, tokensparse.policies.avit\n"
        "assert 'tokensparse.flops' not in sys.modules, 'a policy imports tokensparse.flops'\n"
        "import tokensparse.flops\n"
        "assert tokensparse.flops.linear_macs is __import__('tokensparse.macs').macs.linear_macs\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_no_method_is_chosen_by_name_outside_its_module():
    """Training, evaluation, the CLI, bench and export read a method's `Method` entry and its policy's
    hooks; comparing `method` with a built-in name is left to the method's own module (and the study,
    whose contenders are methods by design)."""
    import re
    from pathlib import Path

    import tokensparse

    src = Path(tokensparse.__file__).parent
    names = "dynamicvit|avit|evit|tome|random|static|dynamicspatial"
    pattern = re.compile(rf'method\s*(==|!=|in|not in)\s*[\(\[]?"({names})"')
    found = [
        f"{path.relative_to(src)}:{number}"
        for path in src.rglob("*.py")
        if path.parent.name not in ("policies", "study")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, f"a method chosen by its name: {found}"


def test_help_imports_no_torch():
    code = (
        "import sys\nfrom tokensparse.cli import build_parser\nbuild_parser()\n"
        "assert 'torch' not in sys.modules, 'building the CLI imported torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
