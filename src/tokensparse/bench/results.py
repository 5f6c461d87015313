"""Result rows and tables: medians, spreads, ratios, a busy machine's warnings, the .md/.json files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .timing import (
    machine_description,
    today,
)


@dataclass
class BenchRow:
    """One contender: executed GFLOPs per image, images per second, and its ratios."""

    method: str
    setting: str
    gflops: float
    images_per_s: float
    speedup: float
    bound_speedup: float | None = None
    spread: float | None = None  # IQR / median of the contender's times
    predictor_bound_speedup: float | None = None
    bound_spread: float | None = None  # IQR / median of the timed bound's times (None: not timed)

    @property
    def bound_too_noisy(self) -> bool:
        """A timed bound noisier than the result (and than 10%) gives no share: the ratio would be noise."""
        return self.bound_spread is not None and self.bound_spread > max(0.10, self.spread or 0.0)

    @property
    def share_of_bound(self) -> float | None:
        if self.bound_speedup is None or self.bound_too_noisy:
            return None
        return self.speedup / self.bound_speedup

    @property
    def share_of_predictor_bound(self) -> float | None:
        bound = self.predictor_bound_speedup
        return None if bound is None else self.speedup / bound


@dataclass
class BenchResult:
    model: str
    batch_size: int
    device: str
    dtype: str
    rounds: int
    machine: str
    date: str
    rows: list[BenchRow]
    warnings: list[str] = field(default_factory=list)

    def table(self) -> str:
        """A Markdown table of the rows; GFLOPs count multiply-adds (MACs), as the papers do."""
        predictor = any(r.predictor_bound_speedup is not None for r in self.rows)
        head = (
            "| method | setting | GFLOPs (MACs)/img | img/s | IQR/median | speedup vs dense | bound "
            "| share of bound |"
        )
        rule = "|---|---|---:|---:|---:|---:|---:|---:|"
        if predictor:
            head, rule = head + " predictor bound | share of predictor bound |", rule + "---:|---:|"
        lines = [head, rule]
        for r in self.rows:
            bound = "" if r.bound_speedup is None else f"{r.bound_speedup:.2f}x"
            if r.bound_spread is not None:
                bound += f" (±{100 * r.bound_spread:.0f}%)"
            share = "" if r.share_of_bound is None else f"{r.share_of_bound:.3f}"
            spread = "" if r.spread is None else f"{100 * r.spread:.1f}%"
            line = (
                f"| {r.method} | {r.setting} | {r.gflops:.2f} | {r.images_per_s:.1f} | {spread} | {r.speedup:.2f}x "
                f"| {bound} | {share} |"
            )
            if predictor:
                pbound = "" if r.predictor_bound_speedup is None else f"{r.predictor_bound_speedup:.2f}x"
                pshare = "" if r.share_of_predictor_bound is None else f"{r.share_of_predictor_bound:.3f}"
                line += f" {pbound} | {pshare} |"
            lines.append(line)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "rows"}
        out["rows"] = [
            dict(
                r.__dict__,
                share_of_bound=r.share_of_bound,
                share_of_predictor_bound=r.share_of_predictor_bound,
            )
            for r in self.rows
        ]
        return out


def busy_warnings(rows: Sequence[BenchRow], max_spread: float = 0.10) -> list[str]:
    """Why these timings may be unreliable: a load average above the core count, or a wide spread."""
    notes = []
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # not on every platform
        load = 0.0
    if load > cores:
        notes.append(
            f"the machine is busy (load average {load:.1f} over {cores} cores): other work inflates and "
            "scatters these timings; measure on an idle machine"
        )
    wide = [f"{r.method} {r.setting}" for r in rows if r.spread is not None and r.spread > max_spread]
    if wide:
        notes.append(
            f"timings spread above {100 * max_spread:.0f}% of their median (IQR) for {', '.join(wide)}: "
            "add --rounds or measure on an idle machine"
        )
    noisy = [f"{r.method} {r.setting} ({100 * r.bound_spread:.0f}%)" for r in rows if r.bound_too_noisy]
    if noisy:
        notes.append(
            f"the timed bound spread more than the result for {', '.join(noisy)}: no share of bound is reported "
            "from it; add --rounds or measure on an idle machine"
        )
    return notes


def _result(name: str, batch_size: int, device: str, dtype: torch.dtype, rounds: int, rows: list[BenchRow]):
    return BenchResult(
        model=name,
        batch_size=batch_size,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        rounds=rounds,
        machine=machine_description(device),
        date=today(),
        rows=rows,
        warnings=busy_warnings(rows),
    )


def write_results(
    folder: str | os.PathLike, stem: str, title: str, command: str, results: Sequence[BenchResult], notes: str
) -> str:
    """Write `<stem>.md` (command, machine, date, one table per batch size) and `<stem>.json`."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# {title}",
        "",
        f"- command: `{command}`",
        f"- machine: {results[0].machine}",
        f"- date: {results[0].date}",
        f"- method: {notes}",
        "",
    ]
    for r in results:
        lines += [
            f"## {r.model}, batch {r.batch_size} ({r.rounds} rounds, {r.device} {r.dtype})",
            "",
            r.table(),
            "",
        ]
    (folder / f"{stem}.md").write_text("\n".join(lines))
    from ..training import json_safe  # a value not measured (NaN) is null: JSON has no NaN

    payload = {"command": command, "results": [r.to_dict() for r in results]}
    (folder / f"{stem}.json").write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")
    return str(folder / f"{stem}.md")
