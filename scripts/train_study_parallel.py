"""Train the study's fine-tunes as parallel processes, in dependency order, for a machine with a GPU.

    python scripts/train_study_parallel.py --work runs/study --device cuda --jobs 12

Each job is `tokensparse demo --study --train-only --work WORK --runs NAME` (one run, one process,
one CPU thread, its log in WORK/logs/NAME.log). A job starts once what it reads is finished: A-ViT's
full-budget runs after the whole loss-weight grid (the setting they train is chosen on the grid's
validation results), the ToMe fine-tune after DynamicViT rho 0.7 (its r is matched to that model's
FLOPs). Among the ready jobs the one with the longest chain (its own canvases and those of the jobs
waiting on it) starts first. Small models train launch-bound on a GPU, so
a dozen processes share one GPU well; each run resumes where a killed one stopped.

`--deadline S` stops the jobs still running after S seconds (they resume from their last epoch);
the exit code is 0 when every run finished, 1 otherwise. A job that fails stops the rest at once
(its log's tail is printed), so a broken set-up costs seconds, not the deadline.

Then, on the machine the speed is reported for and with nothing else running,
`tokensparse demo --study --work WORK` (nothing left to train) evaluates, times and writes the report.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tokensparse.study.config import study_config
from tokensparse.study.runs import grid_name, seed_name


@dataclass
class Job:
    name: str
    canvases: int  # training canvases
    after: list[str] = field(default_factory=list)  # jobs that must finish first


def study_jobs() -> list[Job]:
    """The study's fine-tunes (study_config()) with their sizes and dependencies."""
    cfg = study_config()
    grid = [grid_name(*setting) for setting in cfg.avit_grid]
    jobs = [Job(name, cfg.avit_grid_epochs * cfg.avit_grid_limit) for name in grid]
    dvit = cfg.dynamicvit_epochs * cfg.finetune_limit
    for seed in cfg.seeds:
        jobs.append(Job(seed_name("avit", seed), cfg.avit_epochs * cfg.finetune_limit, after=list(grid)))
        if cfg.dense_finetune:
            jobs.append(Job(seed_name("dense-ft", seed), dvit))
        jobs.append(Job(seed_name(f"dynamicvit@{cfg.keep_ratio}", seed), dvit))
    jobs += [Job(f"dynamicvit@{r}", cfg.dynamicvit_epochs_for(r) * cfg.finetune_limit)
             for r in cfg.dynamicvit_ratios if r != cfg.keep_ratio]  # fmt: skip
    if cfg.baseline_epochs:
        base = cfg.baseline_epochs * cfg.finetune_limit
        jobs += [Job(f"{m}-ft@{cfg.keep_ratio}", base) for m in ("random", "static", "evit")]
        jobs.append(Job("tome-ft", base, after=[f"dynamicvit@{cfg.keep_ratio}"]))
    return jobs


def chain_lengths(jobs: list[Job]) -> dict[str, int]:
    """Each job's canvases plus the longest chain of jobs waiting on it (A-ViT's grid carries its full runs)."""
    chain: dict[str, int] = {}

    def length(job: Job) -> int:
        if job.name not in chain:
            waiting = [length(j) for j in jobs if job.name in j.after]
            chain[job.name] = job.canvases + max(waiting, default=0)
        return chain[job.name]

    for job in jobs:
        length(job)
    return chain


def finished(work: Path, name: str) -> bool:
    """The run `name` has its weights; a name without '@' also names its '@' folders, as `--runs` reads
    it (tome-ft: the folder carries the r found at run time)."""
    runs = [work / name] + (list(work.glob(f"{name}@*")) if "@" not in name else [])
    return any((run / "model.safetensors").is_file() for run in runs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/study")
    p.add_argument("--device", default="cuda")
    p.add_argument("--jobs", type=int, default=12, help="processes at a time")
    p.add_argument("--runs", nargs="+", default=None, metavar="NAME", help="only these runs (default: all)")
    p.add_argument(
        "--avit-workers",
        type=int,
        default=0,
        help="data-loading processes for A-ViT's full runs, the longest chain (the data do not depend on it)",
    )
    p.add_argument("--deadline", type=float, default=None, help="seconds; stop the jobs still running then")
    args = p.parse_args()
    work = Path(args.work)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "TQDM_DISABLE": "1",
    }
    jobs = study_jobs()
    chain = chain_lengths(jobs)
    todo = [j for j in jobs if not finished(work, j.name) and (args.runs is None or j.name in args.runs)]
    running: dict[str, subprocess.Popen] = {}
    done: set[str] = {j.name for j in jobs} - {j.name for j in todo}
    start = time.monotonic()
    failed = None
    while (todo or running) and failed is None:
        if args.deadline is not None and time.monotonic() - start > args.deadline:
            break
        for name, proc in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if not finished(work, name):
                failed = f"{name} (exit code {proc.returncode})"
                break
            done.add(name)
            print(f"{time.monotonic() - start:7.0f}s  finished {name}", flush=True)
        ready = sorted((j for j in todo if set(j.after) <= done), key=lambda j: -chain[j.name])
        while failed is None and ready and len(running) < args.jobs:
            job = ready.pop(0)
            todo.remove(job)
            cmd = [sys.executable, "-m", "tokensparse", "demo", "--study", "--train-only", "--work", str(work),
                   "--device", args.device, "--runs", job.name]  # fmt: skip
            if job.name.split("-seed")[0] == "avit":
                cmd += ["--workers", str(args.avit_workers)]
            with open(logs / f"{job.name}.log", "a") as log:
                running[job.name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            print(f"{time.monotonic() - start:7.0f}s  started {job.name}", flush=True)
        time.sleep(1)
    for proc in running.values():  # the deadline or a failure: each run resumes from its last epoch
        proc.terminate()
    for proc in running.values():
        proc.wait()
    if failed is not None:
        tail = (logs / f"{failed.split()[0]}.log").read_text().splitlines()[-30:]
        print(f"{failed} failed; the end of its log:\n" + "\n".join(tail), file=sys.stderr)
    unfinished = [j.name for j in study_jobs() if not finished(work, j.name)]
    print(f"{time.monotonic() - start:.0f}s; not finished: {unfinished or 'none'}", flush=True)
    return 0 if not unfinished else 1


if __name__ == "__main__":
    raise SystemExit(main())
