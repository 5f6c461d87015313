"""Training-step speed: dense, DynamicViT and A-ViT steps as `tokensparse train` runs them.

    .venv/bin/python benchmarks/bench_train.py                        # CPU fp32: study model, DeiT-S
    .venv/bin/python benchmarks/bench_train.py --device cuda --matmul-size 8192

One process; per model, these contenders are timed round by round in rotating order
(`tokensparse.bench.interleaved`), medians reported:

- a training step of each method: forward, loss (with the teacher's forward where the method
  distils), backward, optimiser step; model, teacher, criterion, parameter groups and optimiser are
  built by tokensparse.train's own functions from a default `TrainConfig` of that method;
- the teacher's forward alone (`teacher_outputs`), so that "step without teacher" = step - teacher;
- one large fp32 matmul (a roofline reference for the GMAC/s of the steps);
- for the study model, one batch of the built-in data set (fashion-mnist-clutter, train split,
  build_dataset/build_loader as train() builds them), as its share of a step.

MACs (multiply-adds) per step are counted by running one step under
`torch.utils.flop_counter.FlopCounterMode` (matmuls, linears, convolutions and attention, forward
AND backward, as executed; FLOPs / 2), with the fused CPU attention kernels added to its table;
the teacher's forward is counted alone and subtracted for the "without teacher" rows. The count is
also given as a multiple of the step's forward MACs (the usual "training ~ 3x forward": backward
computes two products per forward product, except the input gradient of the patch embedding).
Targets: DynamicViT and A-ViT steps without the teacher <= 1.3x the dense step; data
<= 5% of a step.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import shlex
import sys
from dataclasses import dataclass, field

import torch
from results_dir import add_update_flag, results_folder
from timm.optim import create_optimizer_v2
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from tokensparse.bench import interleaved, machine_description, today, write_results
from tokensparse.data import build_dataset, build_loader, num_classes
from tokensparse.losses import teacher_outputs
from tokensparse.train import (
    TrainConfig,
    build_criterion,
    build_model,
    compute_loss,
    parameter_groups,
    sparsify_for,
)

METHODS = ("dense", "dynamicvit", "avit")
MODELS = {
    "study": dict(
        model="vit_tiny_patch16_224",
        model_kwargs=dict(patch_size=8, embed_dim=64, depth=12, num_heads=2),
        img_size=64,
        classes=10,
        batch_size=128,
        data=True,
    ),
    "deit_s": dict(
        model="deit_small_patch16_224", model_kwargs={}, img_size=224, classes=1000, batch_size=16, data=False
    ),
}
DATASET = "fashion-mnist-clutter"


def _cpu_attention_flops() -> dict:
    """FlopCounterMode formulas for the fused CPU attention kernels, which its table lacks."""
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda q, k, v, *args, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v)
        )
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda grad, q, k, v, *args, out_shape=None, **kw: flop_counter.sdpa_backward_flop_count(
                grad, q, k, v
            )
        )
    return mapping


def count_macs(fn) -> float:
    """Multiply-adds `fn()` executes (forward and backward), FLOPs of FlopCounterMode / 2."""
    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as counter:
        fn()
    return counter.get_total_flops() / 2


@dataclass
class Row:
    name: str
    seconds: float
    images: int
    macs: float | None  # per timed call
    vs_dense: float | None = None
    note: str = ""

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.seconds if self.images else None

    @property
    def gmacs_per_s(self) -> float | None:
        return None if self.macs is None else self.macs / self.seconds / 1e9


@dataclass
class TrainBenchResult:
    """Duck-types tokensparse.bench.BenchResult for write_results (table, to_dict and the header fields)."""

    model: str
    batch_size: int
    device: str
    dtype: str
    rounds: int
    machine: str
    date: str
    rows: list[Row]
    targets: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = [
            f"model: {self.model}",
            "",
            "| contender | ms / call | img/s | GMAC / call | GMAC/s | vs dense step | note |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in self.rows:
            ips = "" if r.images_per_s is None else f"{r.images_per_s:.1f}"
            macs = "" if r.macs is None else f"{r.macs / 1e9:.2f}"
            rate = "" if r.gmacs_per_s is None else f"{r.gmacs_per_s:.1f}"
            ratio = "" if r.vs_dense is None else f"{r.vs_dense:.2f}x"
            lines.append(
                f"| {r.name} | {r.seconds * 1e3:.1f} | {ips} | {macs} | {rate} | {ratio} | {r.note} |"
            )
        return "\n".join(lines + [""] + [f"- {t}" for t in self.targets])

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "rows"}
        out["rows"] = [
            dict(r.__dict__, images_per_s=r.images_per_s, gmacs_per_s=r.gmacs_per_s) for r in self.rows
        ]
        return out


def _data_batches(batch_size: int, workers: int, seed: int, device: torch.device):
    """An endless iterator of (images, targets) on `device`, as train() reads them, and the class count."""
    dataset = build_dataset(DATASET, None, "train", None)
    loader = build_loader(dataset, batch_size, True, workers, seed, drop_last=True)

    def batches():
        for epoch in itertools.count():
            loader.sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            for images, targets, *_ in loader:
                yield images.to(device), targets.to(device)

    return batches(), num_classes(dataset)


def bench_model(
    key: str,
    rounds: int,
    warmup: int,
    device: torch.device,
    matmul_size: int,
    workers: int,
    seed: int,
    batch_size: int | None = None,
) -> TrainBenchResult:
    spec = MODELS[key]
    batch = batch_size or spec["batch_size"]
    torch.manual_seed(seed)
    data = None
    classes = spec["classes"]
    if spec["data"]:
        data, classes = _data_batches(batch, workers, seed, device)
        images, targets = next(data)
    else:
        images = torch.randn(batch, 3, spec["img_size"], spec["img_size"], device=device)
        targets = torch.randint(0, classes, (batch,), device=device)

    configs = {
        m: TrainConfig(
            method=m, model=spec["model"], model_kwargs=spec["model_kwargs"], batch_size=batch, seed=seed
        ).resolved()
        for m in METHODS
    }
    base = build_model(configs["dense"], classes, spec["img_size"])
    teacher = copy.deepcopy(base).requires_grad_(False).eval().to(device)  # as train(): the start model
    steps, teachers_used = {}, {}
    for method, cfg in configs.items():
        model = sparsify_for(cfg, copy.deepcopy(base)).to(device).train()
        criterion = build_criterion(cfg, len(model.blocks))
        optimizer = create_optimizer_v2(
            parameter_groups(model, cfg), opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        uses_teacher = method != "dense" and cfg.distill_weight > 0  # train(): only then a teacher
        teachers_used[method] = uses_teacher

        def step(
            cfg=cfg,
            model=model,
            criterion=criterion,
            optimizer=optimizer,
            t=teacher if uses_teacher else None,
        ):
            loss, _ = compute_loss(cfg, model, criterion, t, images, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        steps[method] = (step, model)

    contenders = {f"{m} step": s for m, (s, _) in steps.items()}
    contenders["teacher forward"] = lambda: teacher_outputs(teacher, images)
    a = torch.randn(matmul_size, matmul_size, device=device)
    b = torch.randn(matmul_size, matmul_size, device=device)
    contenders["fp32 matmul"] = lambda: a @ b
    if data is not None:
        contenders["data batch"] = lambda: next(data)

    macs = {f"{m} step": count_macs(s) for m, (s, _) in steps.items()}
    forward_macs = {}
    for method, (_, model) in steps.items():
        with torch.no_grad():
            forward_macs[method] = count_macs(lambda model=model: model(images))
    macs["teacher forward"] = count_macs(lambda: teacher_outputs(teacher, images))
    macs["fp32 matmul"] = float(matmul_size) ** 3

    timings = interleaved(contenders, rounds=rounds, warmup=warmup, device=device)
    seconds = {name: t.median for name, t in timings.items()}
    dense = seconds["dense step"]
    rows, targets = [], []
    for method in METHODS:
        name = f"{method} step"
        train_macs = macs[name] - (macs["teacher forward"] if teachers_used[method] else 0.0)
        note = f"{train_macs / forward_macs[method]:.2f}x its forward MACs"
        if teachers_used[method]:
            note += "; teacher's forward included"
        rows.append(Row(name, seconds[name], batch, macs[name], seconds[name] / dense, note))
        if teachers_used[method]:
            alone = seconds[name] - seconds["teacher forward"]
            rows.append(
                Row(
                    f"{method} step without teacher",
                    alone,
                    batch,
                    train_macs,
                    alone / dense,
                    "step - teacher",
                )
            )
        own = seconds[name] - (seconds["teacher forward"] if teachers_used[method] else 0.0)
        if method != "dense":
            verdict = "met" if own / dense <= 1.3 else "NOT met"
            targets.append(
                f"{method} step without teacher / dense step = {own / dense:.2f}x (target <= 1.3x): {verdict}"
            )
    rows.append(Row("teacher forward", seconds["teacher forward"], batch, macs["teacher forward"], None))
    rows.append(
        Row(
            f"fp32 matmul {matmul_size}^3",
            seconds["fp32 matmul"],
            0,
            macs["fp32 matmul"],
            None,
            "roofline reference",
        )
    )
    if data is not None:
        t = seconds["data batch"]
        rows.append(Row(f"data batch ({DATASET}, train, {workers} workers)", t, batch, None, None))
        for method in METHODS:
            share = t / (t + seconds[f"{method} step"])
            verdict = "met" if share <= 0.05 else "NOT met"
            targets.append(f"data / (data + {method} step) = {share:.1%} (target <= 5%): {verdict}")
    kwargs = ", ".join(f"{k}={v}" for k, v in spec["model_kwargs"].items())
    name = f"{key}: {spec['model']}({kwargs}) img {spec['img_size']}, {classes} classes"
    return TrainBenchResult(
        model=name,
        batch_size=batch,
        device=str(device),
        dtype="float32",
        rounds=rounds,
        machine=machine_description(device),
        date=today(),
        rows=rows,
        targets=targets,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--matmul-size", type=int, default=2048, help="n of the n x n @ n x n reference matmul"
    )
    parser.add_argument("--workers", type=int, default=0, help="data loader workers (train's default: 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="override every model's batch (smoke tests)"
    )
    parser.add_argument("--out", default=None, help="result file stem (default: train_step_<device>_float32)")
    add_update_flag(parser)
    args = parser.parse_args()
    if args.rounds < 1 or args.warmup < 0 or args.matmul_size < 1 or (args.batch_size or 1) < 1:
        parser.error("--rounds, --matmul-size and --batch-size must be >= 1, --warmup >= 0")
    device = torch.device(args.device)
    results = []
    for key in args.models:
        result = bench_model(
            key, args.rounds, args.warmup, device, args.matmul_size, args.workers, args.seed, args.batch_size
        )
        print(f"{result.table()}\n", flush=True)
        results.append(result)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_train.py", *sys.argv[1:]])
    path = write_results(
        results_folder(args),
        args.out or f"train_step_{device.type}_float32",
        "Training-step speed: dense, DynamicViT and A-ViT",
        command,
        results,
        "one process; per model, every contender timed once per round in rotating order "
        "(tokensparse.bench.interleaved), median seconds per call; a step = forward, loss (the teacher's "
        "forward included where the method distils), backward, AdamW step, built by tokensparse.train's "
        "functions from the method's default TrainConfig; random starting weights; 'without teacher' = "
        "step - teacher forward; MACs counted by FlopCounterMode over one step (forward + backward, "
        "FLOPs / 2, the teacher's forward counted alone and subtracted); GMAC/s = MACs / median time; "
        "the fp32 matmul is the roofline reference of the same run",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
