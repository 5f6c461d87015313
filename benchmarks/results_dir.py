"""Where a benchmark script writes its results.

Run as written, a benchmark writes under `runs/bench/` (ignored by git), so the committed files in
`benchmarks/results/` stay as they were measured; `--update-results` writes there instead, to replace a
committed result on purpose (its file then names the command, machine and date of the new run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

COMMITTED = Path(__file__).resolve().parent / "results"
SCRATCH = Path("runs") / "bench"


def add_update_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--update-results",
        action="store_true",
        help=f"write into {COMMITTED.relative_to(COMMITTED.parents[1])}/ (the committed results) instead of "
        f"{SCRATCH}/",
    )


def results_folder(args: argparse.Namespace) -> Path:
    """benchmarks/results with --update-results, else runs/bench (created)."""
    folder = COMMITTED if args.update_results else SCRATCH
    folder.mkdir(parents=True, exist_ok=True)
    if not args.update_results:
        print(f"results go to {folder}/ (--update-results replaces the committed ones in {COMMITTED.name}/)")
    return folder
