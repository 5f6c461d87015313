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
