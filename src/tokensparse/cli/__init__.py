"""Command line: parses arguments and calls the library; every command is a function too.

One module per command (bench, train, evaluate: eval and predict, demo, export) and `args` for the
argument types they share. Nothing here imports torch (or the modules that do) before a command runs,
so `--help`, `--version` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .args import _rank, resolve_device
from .bench import _add_bench
from .demo import _add_demo
from .evaluate import _add_eval, _add_predict
from .export import _add_export
from .train import _add_train, train_config_fields

__all__ = ["build_parser", "main", "resolve_device", "train_config_fields"]


def _version() -> str:
    from .. import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokensparse", description="Token sparsification for timm ViTs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_predict(sub)
    _add_demo(sub)
    _add_export(sub)
    return parser


def _given_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options written on the command line (not left at their defaults)."""
    options = {}
    for action in parser._actions:
        for sub in getattr(action, "choices", None) or {}:
            if isinstance(action.choices, dict):
                for inner in action.choices[sub]._actions:
                    options.update({flag: inner.dest for flag in inner.option_strings})
    return {options[token.split("=", 1)[0]] for token in argv if token.split("=", 1)[0] in options}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if _rank() > 0:  # under torchrun every rank parses the same flags: one message is enough
        for action in parser._subparsers._group_actions if parser._subparsers else ():
            for sub in getattr(action, "choices", {}).values():
                sub.error = lambda message: sys.exit(2)
        parser.error = lambda message: sys.exit(2)
    args = parser.parse_args(argv)
    args.given = _given_dests(parser, sys.argv[1:] if argv is None else list(argv))
    say = _rank() == 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        if say:
            print(f"tokensparse {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only folder, no permission: say which file
        where = f"{err.filename}: " if err.filename else ""
        if say:
            print(f"tokensparse {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
