"""Argument types and shared flags of the commands (no torch import)."""

from __future__ import annotations

import argparse
import json
import math

from ..checks import DTYPE_NAMES


def _methods(timed: bool = False) -> tuple[str, ...]:
    """The registered methods (torch-free); `timed`: those `tokensparse bench` sweeps."""
    from ..policies.registry import get_method, method_names

    return tuple(m for m in method_names() if not timed or get_method(m).bench_setting is not None)


def _dtype(name: str):
    import torch

    return getattr(torch, DTYPE_NAMES[name])


def resolve_device(name: str) -> str:
    """`auto` -> cuda when torch sees a GPU, else cpu; a device torch cannot use -> ValueError naming the flag."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(
            f"--device {name}: not a device torch knows ({err}); use cpu, cuda, cuda:N or auto"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name}: torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                "use --device cpu, or auto to take a GPU when there is one"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    return name


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:N, or auto: a GPU when torch sees one (default: auto)",
    )


def _add_weights(p: argparse.ArgumentParser, positional: bool) -> None:
    """A run folder, or a weights file with --model and --method."""
    what = "a training run folder (config.json + weights), or a weights file with --model and --method"
    if positional:  # `eval RUN` or `eval --run RUN`, as the other commands take it
        p.add_argument("run", nargs="?", default=None, help=what)
        p.add_argument("--run", dest="run_option", default=None, metavar="RUN", help="the same, as a flag")
    else:
        p.add_argument("--run", required=True, metavar="RUN", help=what)
    p.add_argument("--model", default=None, help="timm model name, for a weights file")
    p.add_argument("--method", default=None, choices=_methods(), help="token policy, for a weights file")
    p.add_argument(
        "--img-size", type=int, default=None, help="image size of a weights file (default: from it)"
    )
    _add_model_kwargs(p)


def _add_model_kwargs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-kwargs",
        type=json.loads,
        default=None,
        help="extra timm.create_model kwargs of a weights file, as JSON (a run folder has them)",
    )


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"keep ratio must be a number, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"keep ratio must be in (0, 1], got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _add_target_gflops(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target-gflops",
        type=_positive_float,
        default=None,
        help="a FLOP budget instead of --keep-ratio / --tome-r: the setting at which the model executes at most "
        "this many GMACs per image at its input size, within 2%% (dynamicvit, evit, random, static, tome)",
    )


def _positional_run(args: argparse.Namespace) -> str:
    """The run of a command that takes it positionally or as --run (ValueError: neither, or two)."""
    if args.run is not None and args.run_option is not None and args.run != args.run_option:
        raise ValueError(f"two runs given ({args.run} and --run {args.run_option}): give one")
    run = args.run or args.run_option
    if run is None:
        raise ValueError("give the run folder (or weights file): tokensparse eval RUN, or --run RUN")
    return run


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 speaks."""
    import os

    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0
