"""Re-evaluate the committed study's models with the current code and compare with its committed numbers.

    .venv/bin/python scripts/check_study_reproduces.py --work runs/study \\
        --out benchmarks/results/study/reproduce.md

The study (`tokensparse demo --study`, benchmarks/results/study) evaluates every contender on all
10000 items of Fashion-MNIST's test split (`fashion-mnist-clutter`, with the object boxes, batch 128,
in order) on the CPU. This script rebuilds each contender as `tokensparse.study.contenders` does, but
through the public API (`tokensparse.load_run` for the trained runs, `tokensparse.pretrained`,
`tokensparse.evit` / `tome` / `random_prune` / `static_prune` / `dynamicvit`, the study's object oracle
and `tokensparse.study.gate_center_for_cut`), evaluates it with `tokensparse.evaluate.evaluate` and
compares with what was committed:

- `results.json` in --results: each row's top-1 / top-5 (as item counts), executed GFLOPs (GMACs per
  image, to 1e-6 relative), A-ViT's mean depth on and off the object, the keep ratios per stage and
  the object's kept share; for rows trained with several seeds the mean and each seed's top-1.
- `evaluations.json` in --work (the study's cache of each seed's evaluation, the numbers
  results.json averages): each seed's GFLOPs and other metrics, and the per-item answers (which test
  items the model gets right), when the file is there.

Also checked: the study's settings (`study_config()`) against the committed config, and the study
driver run with nothing to train (`train_study`, `train=False`): A-ViT's starting gate centre, the
loss-weight grid's choice, the ToMe fine-tune's matched r, and that every finished run is reused
(its config.json read back through the method registry equals what the study asks for). The A-ViT
grid runs have committed numbers only from their validation during training (on the GPU they trained
on); they are re-evaluated on the same validation items and shown, but a GPU/CPU difference in A-ViT's
halting is expected, so that table does not count towards the exit code.

No timing: speed is not compared. Exit code 1 when anything compared differs beyond float noise.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

REL = 1e-6  # relative tolerance of GFLOPs and the other float metrics
FLOATS = ("gflops", "mean_depth", "object_depth", "background_depth", "object_kept")
COUNTS = ("top1", "top5")  # percentages of `images`, compared as item counts


@dataclass
class Evaluation:
    """One model evaluated: a run folder (one seed of a row) or a training-free row."""

    key: str  # the run's folder name, or the row's name when training-free
    row: str  # the results.json row it belongs to
    build: Callable[[], nn.Module]
    note: str = ""
    now: dict = field(default_factory=dict)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work", required=True, help="the study's runs folder (tokensparse demo --study --work)"
    )
    parser.add_argument("--results", default="benchmarks/results/study", help="the committed study report")
    parser.add_argument("--out", default="runs/bench/study_reproduce.md", help="the markdown file written")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--no-contenders", action="store_true", help="only the trained runs, not the training-free rows"
    )
    parser.add_argument("--no-grid", action="store_true", help="skip the A-ViT grid runs' validation")
    parser.add_argument("--no-driver", action="store_true", help="skip the study driver's checks")
    parser.add_argument("--rows", nargs="+", help="only these results.json rows (a quick look)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in [_shown_path(sys.argv[0]), *sys.argv[1:]])
    checker = Checker(Path(args.work), Path(args.results), args)
    ok = checker.run()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(checker.markdown(command))
    print(f"\n{'everything compared is equal' if ok else 'DIFFERENCES found'}; written to {out}")
    return 0 if ok else 1


def _shown_path(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def log(message: str) -> None:
    print(message, flush=True)


class Checker:
    def __init__(self, work: Path, results: Path, args: argparse.Namespace) -> None:
        from tokensparse.study import study_config

        self.work, self.results_dir, self.args = work, results, args
        record = json.loads((results / "results.json").read_text())
        self.record = record
        self.committed: dict[str, dict] = record["results"]
        cache = work / "evaluations.json"
        self.cache: dict[str, dict] = json.loads(cache.read_text()) if cache.is_file() else {}
        self.cfg = study_config(work=str(work), report=str(results), train=False)
        self.evaluations: list[Evaluation] = []
        self.checks: list[tuple[str, str, str, bool]] = []  # what, committed, now, equal
        self.grid_rows: list[tuple[str, dict, dict]] = []
        self.skipped: list[str] = []
        self.code = _git_head()  # the code as this run imports it

    # --- what the study evaluates -------------------------------------------------------------------

    def wanted(self, row: str) -> bool:
        return self.args.rows is None or row in self.args.rows

    def run(self) -> bool:
        import tokensparse
        from tokensparse.data import build_dataset, build_loader

        self.check_config()
        test = build_dataset(
            "fashion-mnist-clutter", split="test", limit=self.cfg.test_limit, return_box=True
        )
        loader = build_loader(test, self.cfg.batch_size, is_training=False)
        self.items = len(test)
        self.dense = tokensparse.pretrained(self.cfg.teacher).eval()
        self.trained_evaluations()
        if self.args.no_contenders:
            self.skipped.append("the training-free rows (--no-contenders)")
        else:
            self.free_evaluations(test)
        if self.args.rows is not None:
            self.skipped.append(f"every row but {', '.join(self.args.rows)} (--rows)")
        for i, ev in enumerate(self.evaluations, 1):
            log(f"[{i}/{len(self.evaluations)}] evaluating {ev.key} on the test split")
            ev.now = _evaluate(ev.build(), loader)
        if self.args.no_grid:
            self.skipped.append("the A-ViT grid runs' validation (--no-grid)")
        elif self.args.rows is None:
            self.grid_evaluations()
        if self.args.no_driver or self.args.rows is not None:
            self.skipped.append("the study driver's checks")
        else:
            self.driver_checks()
        return self.all_equal()

    def check_config(self) -> None:
        """The study's settings now against the committed ones (where it reads and what it evaluates).

        A setting added since (absent from the committed config) is listed but not counted: it adds to
        the study (a new contender) rather than changing what the committed rows evaluate."""
        now = json.loads(json.dumps(dataclasses.asdict(self.cfg)))
        saved = self.record["config"]
        aside = {"work", "report", "train", "only"}  # where it runs, and train=False here
        keys = sorted((set(now) | set(saved)) - aside)
        changed = [k for k in keys if k in saved and now.get(k, "(removed)") != saved[k]]
        added = [k for k in keys if k not in saved]
        text = (
            "the same"
            if not changed
            else "differs: " + ", ".join(f"{k} {now.get(k, '(removed)')!r}" for k in changed)
        )
        if added:
            text += "; added since (not counted): " + ", ".join(f"{k} {now[k]!r}" for k in added)
        self.checks.append(
            (
                "study_config() vs the committed config (every committed field but work, report, train, only)",
                f"{len(set(saved) - aside)} fields",
                text,
                not changed,
            )
        )

    def trained_evaluations(self) -> None:
        import tokensparse
        from tokensparse.study.runs import seed_name

        for row, saved in self.committed.items():
            family = saved["family"]
            trained = family in ("dense-ft", "dynamicvit", "avit") or family.endswith("-ft")
            if not trained or not self.wanted(row):
                continue
            run = row
            if family == "avit" and saved.get("budget") == "grid":
                run = saved["grid_run"]
            seeds = [int(s) for s in saved["seeds"]] if "seeds" in saved else [self.cfg.seed]
            for seed in seeds:
                key = seed_name(run, seed)
                path = self.work / key
                note = ""
                if family == "avit":
                    centre = json.loads((path / "config.json").read_text())["gate_center"]
                    note = (
                        f"gate centre {centre:g} (committed: evaluated at {saved['gate_center_evaluated']:g})"
                    )
                    if not math.isclose(centre, saved["gate_center_evaluated"], rel_tol=0, abs_tol=1e-12):
                        self.checks.append((f"{key}: gate centre evaluated", str(saved["gate_center_evaluated"]),
                                            str(centre), False))  # fmt: skip
                self.evaluations.append(Evaluation(key, row, lambda p=path: tokensparse.load_run(p), note))

    def free_evaluations(self, test) -> None:
        """The training-free rows, built as `tokensparse.study.contenders` builds them."""
        import tokensparse
        from tokensparse.data import build_dataset
        from tokensparse.study import gate_center_for_cut
        from tokensparse.study.oracle import clutter_object_masks, object_oracle

        cfg, dense, work = self.cfg, self.dense, self.work

        def copy_dense() -> nn.Module:
            return copy.deepcopy(dense)

        def add(name: str, build: Callable[[], nn.Module], note: str = "") -> None:
            if self.wanted(name):
                self.evaluations.append(Evaluation(name, name, build, note))

        add("dense", copy_dense, "the shipped model")
        for ratio in cfg.curve_ratios:
            add(
                f"random@{ratio}",
                lambda r=ratio: tokensparse.random_prune(copy_dense(), keep_ratio=r, seed=0),
            )
            add(f"static@{ratio}", lambda r=ratio: tokensparse.static_prune(copy_dense(), keep_ratio=r))
        # EViT and ToMe at the settings whose executed FLOPs match each DynamicViT's (found again here)
        patches = dense.patch_embed.num_patches
        for ratio in cfg.dynamicvit_ratios:
            if not any(self.wanted(n) for n in self.committed if n.split("@")[0] in ("evit", "tome")):
                break
            target = tokensparse.gflops(tokensparse.load_run(work / f"dynamicvit@{ratio}"), batch=2)
            rates = [x / 100 for x in range(30, 100, 2)]
            rate = _match(lambda r: tokensparse.evit(copy_dense(), keep_ratio=r), rates, target)
            r_match = int(
                _match(lambda r: tokensparse.tome(copy_dense(), r=int(r)), range(1, patches // 2), target)
            )
            note = f"matched to dynamicvit@{ratio}'s FLOPs"
            add(f"evit@{rate:g}", lambda r=rate: tokensparse.evit(copy_dense(), keep_ratio=r), note)
            add(f"tome@r{r_match}", lambda r=r_match: tokensparse.tome(copy_dense(), r=r), note)
        headline = work / f"dynamicvit@{cfg.keep_ratio}"
        if cfg.oracle and (
            self.wanted(f"oracle@{cfg.keep_ratio}") or self.wanted(f"oracle-ft@{cfg.keep_ratio}")
        ):
            masks = clutter_object_masks(test, dense.patch_embed.patch_size[0])
            predictors = {
                k: v
                for k, v in tokensparse.load_run(headline).state_dict().items()
                if k.startswith("score_predictor.")
            }

            def shipped_oracle() -> nn.Module:
                model = tokensparse.dynamicvit(copy_dense(), keep_ratio=cfg.keep_ratio)
                model.load_state_dict(predictors, strict=False)
                return object_oracle(model, masks)

            add(f"oracle@{cfg.keep_ratio}", shipped_oracle, "shipped backbone, dynamicvit@0.7's predictors")
            add(f"oracle-ft@{cfg.keep_ratio}", lambda: object_oracle(tokensparse.load_run(headline), masks),
                "dynamicvit@0.7's fine-tuned model")  # fmt: skip
        # A-ViT's first seed with its gate centre moved to cut FLOPs on validation images (found again here)
        moved = [cut for cut in cfg.avit_cuts if self.wanted(f"avit-moved@{cut:g}")]
        if moved:
            val = build_dataset("fashion-mnist-clutter", split="val", limit=cfg.calibration_images)
            images = torch.stack([val[i][0] for i in range(len(val))])
            dense_val = tokensparse.gflops(dense, images)
            avit = tokensparse.load_run(work / "avit")
            for cut in moved:
                name = f"avit-moved@{cut:g}"
                log(f"finding {name}'s gate centre")
                centre = gate_center_for_cut(avit, images, cut, dense_val)
                saved = self.committed.get(name, {}).get("gate_center_evaluated")
                self.checks.append((f"{name}: gate centre found on validation", f"{saved}", f"{centre}",
                                    saved is not None and math.isclose(centre, saved, rel_tol=REL)))  # fmt: skip

                def build(c: float = centre) -> nn.Module:
                    model = tokensparse.load_run(work / "avit")
                    model.halting.gate_center = c
                    return model

                add(name, build, f"gate centre {centre:g}")

    def grid_evaluations(self) -> None:
        """A-ViT's loss-weight grid runs on the validation items their training validated on."""
        import tokensparse
        from tokensparse.data import CLUTTER_NAME, build_dataset, build_loader

        for name, saved in self.record.get("avit_grid", {}).items():
            log(f"evaluating {name} on the validation split")
            model = tokensparse.load_run(self.work / name)
            run = model.tokensparse_run
            boxes = {"return_box": True} if run.dataset == CLUTTER_NAME else {}
            val = build_dataset(run.dataset, run.data_root, "val", run.img_size, limit=run.val_limit, **boxes)
            now = _evaluate(model, build_loader(val, run.batch_size, False, 0, run.seed))
            device = json.loads((self.work / name / "config.json").read_text()).get("device", "?")
            self.grid_rows.append((name, saved, now | {"trained_on": device}))

    def driver_checks(self) -> None:
        """The study driver with nothing to train: what it decides from the finished runs."""
        from tokensparse.study import train_study

        log("the study driver with train=False (reuses the finished runs)")
        try:
            study = train_study(self.cfg)
        except Exception as err:  # noqa: BLE001  (a refusal to reuse a run is a finding)
            self.checks.append(
                ("train_study(train=False)", "runs reused", f"{type(err).__name__}: {err}", False)
            )
            return
        start = self.record["avit_start"]["gate_center"]
        self.checks.append(("A-ViT's starting gate centre (calibrated on validation)", f"{start:g}",
                            f"{study.start_center:g}", study.start_center == start))  # fmt: skip
        chosen = self.committed.get("avit", {}).get("grid_run")
        self.checks.append(("the grid run chosen", str(chosen), str(study.chosen), study.chosen == chosen))
        for name, saved in self.record.get("avit_grid", {}).items():
            now = study.grid.get(name, {})
            same = (
                now.get("chosen") == saved["chosen"]
                and now.get("in_window") == saved["in_window"]
                and _close(now.get("fewer_flops"), saved["fewer_flops"])
            )
            self.checks.append((f"{name}: share of FLOPs cut, in the window, chosen",
                                _grid_text(saved), _grid_text(now), same))  # fmt: skip
        runs = sorted(p.name for p in self.work.iterdir() if (p / "model.safetensors").is_file())
        reused = sorted(set(study.reused))
        new = (
            f"; not trained yet, new since (not counted): {', '.join(study.missing)}" if study.missing else ""
        )
        self.checks.append(("finished runs reused with the same settings (config.json compared)",
                            f"{len(runs)} runs", f"{len(reused)} reused{new}", reused == runs))  # fmt: skip
        ft = sorted(
            n for n, r in self.committed.items() if r["family"].endswith("-ft") and r["family"] != "dense-ft"
        )
        self.checks.append(("the fine-tuned baselines (ToMe's r matched to DynamicViT's FLOPs)", ", ".join(ft),
                            ", ".join(sorted(study.baselines)), sorted(study.baselines) == ft))  # fmt: skip

    # --- comparison ---------------------------------------------------------------------------------

    def reference(self, ev: Evaluation) -> tuple[dict, str]:
        """The committed numbers of one evaluation and where they come from."""
        saved = self.committed.get(ev.row)
        cached = self.cache.get(ev.key, {})
        if saved is None:
            return {}, "not in results.json"
        if "seeds" not in saved:
            ref = {
                k: v for k, v in saved.items() if k in (*COUNTS, *FLOATS, "images", "keep_ratio_per_stage")
            }
            if "correct" in cached:
                ref["correct"] = cached["correct"]
            return ref, "results.json"
        seed = ev.key.rsplit("-seed", 1)[1] if "-seed" in ev.key else "0"
        ref = {
            k: v
            for k, v in cached.items()
            if k in (*COUNTS, *FLOATS, "images", "keep_ratio_per_stage", "correct")
        }
        ref["top1"] = saved["seeds"][seed]  # the committed number itself
        ref.setdefault("images", saved["images"])
        return (
            ref,
            "results.json (top-1), evaluations.json (the rest)" if cached else "results.json (top-1 only)",
        )

    def compare(self, ref: dict, now: dict) -> list[str]:
        """What differs between a committed and a new evaluation (empty: equal)."""
        if not ref:
            return ["no committed row of this name"]
        images = int(ref.get("images", now["images"]))
        out = []
        if now["images"] != images:
            out.append(f"{now['images']} items evaluated, committed {images}")
        for k in COUNTS:
            if k in ref:
                a, b = _count(ref[k], images), _count(now[k], now["images"])
                if a != b:
                    out.append(f"{k} {b - a:+d} items")
        full = "gflops" in ref  # a whole committed record (not only a seed's top-1)
        for k in FLOATS:
            if k in ref and k not in now:
                out.append(f"{k} missing now")
            elif k in now and k not in ref and full:
                out.append(f"{k} only now")
            elif k in ref and not _close(now[k], ref[k]):
                out.append(f"{k} {(now[k] - ref[k]) / ref[k]:+.2e} rel")
        if "keep_ratio_per_stage" in ref and ref["keep_ratio_per_stage"] != now.get("keep_ratio_per_stage"):
            out.append(f"keep ratios {now.get('keep_ratio_per_stage')} vs {ref['keep_ratio_per_stage']}")
        if "correct" in ref:
            flips = sum(a != b for a, b in zip(ref["correct"], now["correct"]))
            if flips:
                out.append(f"{flips} items answered differently")
        return out

    def row_means(self) -> list[tuple[str, dict, dict, list[str]]]:
        """Rows trained with several seeds: the committed seed means against the new ones."""
        out = []
        for row, saved in self.committed.items():
            each = [ev.now for ev in self.evaluations if ev.row == row]
            if "seeds" not in saved or len(each) != len(saved["seeds"]):
                continue
            images = saved["images"]
            now = {
                k: sum(e[k] for e in each) / len(each)
                for k in (*COUNTS, *FLOATS)
                if all(k in e for e in each)
            }
            problems = []
            for k in COUNTS:
                a = round(saved[k] * len(each) * images / 100)
                b = sum(_count(e[k], e["images"]) for e in each)
                if a != b:
                    problems.append(f"{k} {b - a:+d} items over the seeds")
            for k in FLOATS:
                if k in saved and not _close(now.get(k), saved[k]):
                    problems.append(f"{k} differs")
            out.append((row, saved, now, problems))
        return out

    def all_equal(self) -> bool:
        self.diffs = {ev.key: self.compare(self.reference(ev)[0], ev.now) for ev in self.evaluations}
        means = self.row_means()
        unmatched = [
            n for n in self.committed if self.wanted(n) and not any(ev.row == n for ev in self.evaluations)
        ]
        if not self.args.no_contenders:
            self.checks.append(("results.json rows re-evaluated", f"{sum(map(self.wanted, self.committed))} rows",
                                "all" if not unmatched else f"not built now: {', '.join(unmatched)}",
                                not unmatched))  # fmt: skip
        self.means = means
        return (
            not any(self.diffs.values())
            and not any(p for *_, p in means)
            and all(equal for *_, equal in self.checks)
        )

    # --- the report ---------------------------------------------------------------------------------

    def markdown(self, command: str) -> str:
        from tokensparse.bench import machine_description, today

        equal = sum(not d for d in self.diffs.values())
        lines = [
            "# The committed study re-evaluated with the current code",
            "",
            f"- command: `{command}`",
            f"- date: {today()}",
            f"- machine: {machine_description('cpu')}",
            f"- code: {self.code}",
            f"- committed numbers: `{self.results_dir}/results.json` (its `results`); each seed's GFLOPs, other "
            f"metrics and per-item answers from the study's cache `{self.work.name}/evaluations.json`, whose seed "
            "means are the committed rows",
            f"- items: Fashion-MNIST's test split, all {self.items} items, with object boxes, "
            f"batch {self.cfg.batch_size}, in order, on the CPU (as `tokensparse.study` evaluates)",
            "- equal: top-1 and top-5 as item counts exactly, GFLOPs (executed GMACs per image) and A-ViT's "
            f"depths / the object's kept share to {REL:g} relative, keep ratios per stage exactly, and each "
            "item's answer (right or wrong) where the cache holds it. No timing.",
            f"- result: {equal} of {len(self.diffs)} evaluations equal"
            + (f"; {len(self.diffs) - equal} differ" if equal < len(self.diffs) else "")
            + f"; study checks: {sum(c[3] for c in self.checks)} of {len(self.checks)} equal",
        ]
        if self.skipped:
            lines.append(f"- not checked in this run: {'; '.join(self.skipped)}")
        lines += [
            "",
            "## Each evaluation",
            "",
            "One line per trained run (each seed) and per training-free row of the study.",
            "",
            "| run | row | committed top-1 | now top-1 | committed GFLOPs | now GFLOPs | equal? | also compared | note |",
            "|---|---|---:|---:|---:|---:|---|---|---|",
        ]
        for ev in self.evaluations:
            ref, source = self.reference(ev)
            diff = self.diffs[ev.key]
            also = [k.replace("_", " ") for k in ("top5", *FLOATS[1:], "keep_ratio_per_stage") if k in ref]
            if "correct" in ref:
                also.append("per-item answers")
            lines.append(
                f"| {ev.key} | {ev.row} | {_pct(ref.get('top1'))} | {_pct(ev.now['top1'])} | "
                f"{_g(ref.get('gflops'))} | {_g(ev.now['gflops'])} | "
                f"{'yes' if not diff else 'NO: ' + '; '.join(diff)} | {', '.join(also)} | "
                f"{'; '.join(filter(None, [ev.note, _depth(ev.now), _source_note(source)]))} |"
            )
        if self.means:
            lines += [
                "",
                "## Rows trained with several seeds (the committed means)",
                "",
                "| row | seeds | committed top-1 | now top-1 | committed GFLOPs | now GFLOPs | equal? |",
                "|---|---:|---:|---:|---:|---:|---|",
            ]
            for row, saved, now, problems in self.means:
                lines.append(
                    f"| {row} | {len(saved['seeds'])} | {saved['top1']:.4f} | {now['top1']:.4f} | "
                    f"{_g(saved['gflops'])} | {_g(now['gflops'])} | {'yes' if not problems else 'NO: ' + '; '.join(problems)} |"
                )
        if self.checks:
            lines += ["", "## The study's settings and decisions", "", "| check | committed | now | equal? |",
                      "|---|---|---|---|"]  # fmt: skip
            lines += [f"| {w} | {a} | {b} | {'yes' if e else 'NO'} |" for w, a, b, e in self.checks]
        if self.grid_rows:
            lines += [
                "",
                "## A-ViT's loss-weight grid on validation (not counted)",
                "",
                "These runs' committed numbers are their last epoch's validation in training, made on the device "
                "they trained on; here the same weights on the same validation items on this CPU. A-ViT halts a "
                "token when its summed scores pass a threshold, so float differences between devices can move a "
                "few tokens' depths and a few answers: the table shows the differences, the exit code ignores "
                "them.",
                "",
                "| run | trained on | committed val top-1 | now | committed val GFLOPs | now | rel. | committed mean depth | now |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for name, saved, now in self.grid_rows:
                rel = (now["gflops"] - saved["val_gflops"]) / saved["val_gflops"]
                lines.append(
                    f"| {name} | {now['trained_on']} | {saved['val_top1']:.2f} | {now['top1']:.2f} | "
                    f"{_g(saved['val_gflops'])} | {_g(now['gflops'])} | {rel:+.1e} | "
                    f"{saved['val_mean_depth']:.4f} | {now.get('mean_depth', float('nan')):.4f} |"
                )
        return "\n".join(lines) + "\n"


def _evaluate(model: nn.Module, loader) -> dict:
    from tokensparse.evaluate import evaluate

    result = evaluate(model, loader, device="cpu", progress=False, per_item=True)
    result.pop("img_s", None)  # no timing
    return result


def _match(build: Callable[[float], nn.Module], candidates, target: float) -> float:
    """The candidate setting whose model's executed GFLOPs come closest to `target` (as the study)."""
    import tokensparse

    return min(candidates, key=lambda s: abs(tokensparse.gflops(build(s).eval(), batch=2) - target))


def _count(percent: float, images: int) -> int:
    return round(percent * images / 100)


def _close(a, b) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=REL, abs_tol=1e-15)


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _g(v) -> str:
    return "-" if v is None else f"{v:.10g}"


def _depth(now: dict) -> str:
    if "mean_depth" in now:
        return f"mean depth {now['mean_depth']:.4f}"
    return ""


def _source_note(source: str) -> str:
    return "" if source == "results.json" else f"committed: {source}"


def _grid_text(m: dict) -> str:
    if not m:
        return "-"
    return f"{m.get('fewer_flops', float('nan')):.4%}, {m.get('in_window')}, {m.get('chosen')}"


def _git_head() -> str:
    """The commit, and the files under src/ that differ from it (the code evaluated is the working tree)."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    changed = [line[3:] for line in dirty.stdout.splitlines() if line.strip()]
    return head.stdout.strip() + (f" with uncommitted changes to {', '.join(changed)}" if changed else "")


if __name__ == "__main__":
    sys.exit(main())
