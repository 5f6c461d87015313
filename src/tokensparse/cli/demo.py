"""`tokensparse demo`."""

from __future__ import annotations

import argparse

from .args import _add_device, _non_negative_int, resolve_device


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: fine-tune DynamicViT and A-ViT from the shipped dense model, compare with the "
        "baselines at matched FLOPs, write report/ (a re-run reuses finished steps)",
        description="Start from the shipped dense model (tokensparse.pretrained('clutter-vit')), fine-tune "
        "DynamicViT and A-ViT with their authors' recipes on the built-in cluttered Fashion-MNIST, evaluate "
        "them and ToMe/EViT/random/static at matched executed FLOPs on the test split, time the headline "
        "rows, and write a report with the table, the papers' claims checked and figures. --study runs "
        "the full study (benchmarks/results/study).",
    )
    p.add_argument(
        "--work", default=None, help="where runs and evaluations are kept (default: runs/demo, runs/study)"
    )
    p.add_argument("--report", default=None, help="report folder (default: report, benchmarks/results/study)")
    p.add_argument(
        "--study",
        "--replication",
        dest="study",
        action="store_true",
        help="the full study: DynamicViT at rho 0.5/0.7/0.9, fine-tunes at the authors' relative budget, "
        "three seeds of the headline rows, A-ViT's loss weights chosen on validation, fine-tuned baselines, "
        "the whole test split",
    )
    p.add_argument(
        "--runs",
        nargs="+",
        default=None,
        metavar="NAME",
        help="train only these runs (their work-folder names, e.g. dynamicvit@0.7 avit-seed1, or the part before "
        "'@': tome-ft is the ToMe fine-tune at the r matched at run time); the others are "
        "used when finished: two processes can share the study's training this way",
    )
    p.add_argument(
        "--finished-only",
        action="store_true",
        help="train nothing: evaluate and report the fine-tunes already finished (an interim report that "
        "names the missing runs)",
    )
    p.add_argument(
        "--train-only",
        action="store_true",
        help="run (or resume) the fine-tunes only; a later run without it reuses them, evaluates and reports",
    )
    p.add_argument(
        "--workers",
        type=_non_negative_int,
        default=0,
        help="data-loading processes per fine-tune (default 0; the data do not depend on it)",
    )
    _add_device(p)
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, run_study, study_config

    overrides = {"device": resolve_device(args.device), "workers": args.workers}
    overrides |= {k: getattr(args, k) for k in ("work", "report") if getattr(args, k) is not None}
    if args.runs is not None:
        overrides["only"] = tuple(args.runs)
    if args.finished_only:
        if args.train_only:
            raise ValueError("--finished-only trains nothing and --train-only only trains: give one of them")
        overrides["train"] = False
    cfg = study_config(**overrides) if args.study else DemoConfig(**overrides)
    run_study(cfg, train_only=args.train_only)
    return 0
