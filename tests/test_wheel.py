"""The package as users get it: a wheel built from this checkout, installed into a fresh virtual
environment outside it, works there: the README's quick start, `tokensparse --version`, the shipped model
and one CLI evaluation. The new environment borrows the installed dependencies (torch, timm, ...) through
a path entry, never this checkout's own editable install."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
        str(ROOT),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    (built,) = out.glob("tokensparse-*.whl")
    return built


def test_the_wheel_carries_the_shipped_model_its_card_and_types(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("tokensparse/models/clutter_vit.safetensors", "tokensparse/models/clutter_vit.md",
                 "tokensparse/py.typed", "tokensparse/cli/__init__.py", "tokensparse/losses/avit.py"):  # fmt: skip
        assert name in names, name
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_the_wheel_works_outside_the_checkout(wheel, tmp_path):
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    # the dependencies of this environment, as a plain path entry: the editable finder's .pth is not run
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, str(wheel)], check=True
    )
    work = tmp_path / "user"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "2"}

    def run(*args: str) -> str:
        done = subprocess.run([str(python), *args], cwd=work, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    where = run("-c", "import tokensparse; print(tokensparse.__file__)")
    assert where.startswith(site), where  # the wheel's copy, not this checkout's
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert run("-m", "tokensparse", "--version").strip().endswith(version)
    quick = re.search(r"## Quick start\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(
        1
    )
    assert "[137, 96, 67]" in run("-c", quick)
    run("-c", "import tokensparse; m = tokensparse.pretrained('clutter-vit'); assert m.num_classes == 10")
    run("-m", "tokensparse", "train", "--method", "dynamicvit", "--checkpoint", "clutter-vit", "--epochs", "1",
        "--train-limit", "64", "--val-limit", "32", "--output", "run")  # fmt: skip
    assert '"top1"' in run("-m", "tokensparse", "eval", "run", "--json")
