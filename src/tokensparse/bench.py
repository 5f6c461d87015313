"""Paired, interleaved throughput measurement.

All contenders run in one process on the same input; each round times every contender once, in a
rotating order, so drifts of the machine (clock, other load) hit them alike. We report medians and
ratios against the dense model and against the truncation bound: the same dense timm blocks fed
pre-sliced token counts, i.e. pruning with zero overhead.
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from timm.models.convnext import ConvNeXt
from timm.models.vision_transformer import VisionTransformer

from .checks import DTYPE_NAMES
from .engine import embed

DTYPES = {name: getattr(torch, value) for name, value in DTYPE_NAMES.items()}
"""--dtype names (float32, fp32, bfloat16, bf16, float16, fp16) -> torch dtypes, for the benchmarks."""


@dataclass
class Timing:
    name: str
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """Interquartile range of the times relative to their median (0 with fewer than two)."""
        if len(self.seconds) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.seconds, n=4, method="inclusive")
        return (q3 - q1) / self.median


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    contenders: dict[str, Callable[[], object]],
    rounds: int = 10,
    warmup: int = 2,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> dict[str, Timing]:
    """Time each zero-argument callable `rounds` times, interleaved (rotating order); after `warmup`."""
    device = torch.device(device)
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    _sync(device)
    timings = {name: Timing(name) for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            _sync(device)
            start = time.perf_counter()
            contenders[name]()
            _sync(device)
            timings[name].seconds.append(time.perf_counter() - start)
        if progress is not None:
            progress(1)
    return timings


@torch.no_grad()
def truncated_forward(
    model: VisionTransformer, images: torch.Tensor, tokens_per_block: Sequence[int]
) -> torch.Tensor:
    """The dense model with its sequence sliced to `tokens_per_block[i]` tokens before block i.

    No scoring, no gather: the speed of pruning with zero overhead, the bound a pruning method can reach.
    A count of 0 stops there (the image exited early, as A-ViT's does): the head reads the tokens as
    the last block that ran left them.
    """
    x = embed(model, images)
    for block, tokens in zip(model.blocks, tokens_per_block):
        if tokens == 0:
            break
        if tokens < x.shape[1]:
            x = x[:, :tokens]
        x = block(x)
    return model.forward_head(model.norm(x))


@torch.no_grad()
def predictor_bound_forward(
    model: VisionTransformer, predictors: nn.ModuleList, images: torch.Tensor, tokens_per_block: Sequence[int]
) -> torch.Tensor:
    """`truncated_forward` plus DynamicViT's predictor MLPs, run on the patch tokens before each location.

    The predictors' own matmuls but no top-k, sort or gather: the bound of a DynamicViT whose token
    selection costs nothing. `predictors` is a DynamicViT policy (`model.score_predictor` of a
    DynamicViT), read for its `locations` and per-stage `keep_score`.
    """
    prefix = model.num_prefix_tokens
    x = embed(model, images)
    for index, (block, tokens) in enumerate(zip(model.blocks, tokens_per_block)):
        if index in predictors.locations:
            predictors[predictors.locations.index(index)].keep_score(x[:, prefix:])
        if tokens < x.shape[1]:
            x = x[:, :tokens]
        x = block(x)
    return model.forward_head(model.norm(x))


def machine_description(device: torch.device | str = "cpu") -> str:
    """One line naming the machine: CPU model, vector ISA and cores (or the GPU), torch version and threads."""
    device = torch.device(device)
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        # the vector ISA torch dispatches to (AVX2, AVX512, ...): bf16 and fp32 speed depend on it
        hw = f"{cpu} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores"
    return f"{hw}; torch {torch.__version__}, {torch.get_num_threads()} threads; {platform.system()}"


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


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


def _build(
    model: str | nn.Module, img_size: int | None, num_classes: int | None, spatial: bool = False
) -> tuple[str, nn.Module]:
    """(name, the dense timm model): a ViT for the token methods, a ConvNeXt / Swin for `spatial`."""
    import timm

    from .policies.dynspatial import is_spatial_model

    if isinstance(model, nn.Module):
        return type(model).__name__, model
    kwargs = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        built = timm.create_model(model, pretrained=False, **kwargs)
        if img_size is not None and not isinstance(built, ConvNeXt):  # a ConvNeXt runs at any size
            built = timm.create_model(model, pretrained=False, img_size=img_size, **kwargs)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise ValueError(f"{err} (timm.list_models('*vit*') lists the ViTs)") from err
    if img_size is not None and isinstance(built, ConvNeXt):
        built.pretrained_cfg = {**built.pretrained_cfg, "input_size": (3, img_size, img_size)}
    if spatial and not is_spatial_model(built):
        raise ValueError(
            f"--method dynamicspatial needs a ConvNeXt or Swin; --model {model} is a {type(built).__name__}"
        )
    if not spatial and not isinstance(built, VisionTransformer):
        hint = "; for a ConvNeXt / Swin use --method dynamicspatial" if is_spatial_model(built) else ""
        raise ValueError(
            f"--model {model} is a {type(built).__name__}, not a vision transformer: tokensparse needs a timm "
            f"VisionTransformer such as deit_small_patch16_224 or vit_base_patch16_224{hint}"
        )
    return model, built


def _time_all(
    contenders: dict[str, Callable[[], object]],
    label: str,
    rounds: int,
    warmup: int,
    device: str,
    progress: bool,
) -> dict[str, Timing]:
    """Each contender's times, interleaved, under inference mode, with a progress bar."""
    from tqdm.auto import tqdm

    bar = tqdm(total=rounds, desc=label, disable=not progress, leave=False)
    with torch.inference_mode():
        timings = interleaved(contenders, rounds=rounds, warmup=warmup, device=device, progress=bar.update)
    bar.close()
    return timings


def _gflops(model: nn.Module, images: torch.Tensor) -> float:
    """Mean executed GFLOPs per image of `images`, counted on an fp32 CPU copy (counts do not depend on
    device or dtype, and the timed model is left as it is)."""
    from .flops import model_flops

    return float(model_flops(copy.deepcopy(model).float().cpu(), images.float().cpu()).mean()) / 1e9


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


def make_policy(method: str, setting: float | None = None) -> Callable[[nn.Module], nn.Module]:
    """A function sparsifying a dense model with the registered `method`, its recipe's settings but its
    `bench_setting` (a keep ratio; r for ToMe) at `setting` (None: the recipe's)."""
    from .config import TrainConfig
    from .policies.registry import get_method, resolve

    spec = get_method(method)
    if spec.sparsify is None:
        raise ValueError(f"{method!r} sparsifies nothing; choose a token method")
    overrides = {} if setting is None or spec.bench_setting is None else {spec.bench_setting: setting}
    cfg = TrainConfig(method=method, **overrides).resolved()
    build = resolve(spec.sparsify)
    return lambda m: build(m, cfg)


def bench_dynamicvit(
    model: str | nn.Module = "deit_small_patch16_224",
    keep_ratios: Sequence[float] = (0.7,),
    batch_size: int = 32,
    rounds: int = 10,
    warmup: int = 2,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    img_size: int | None = None,
    progress: bool = True,
    seed: int = 0,
    method: str = "dynamicvit",
    also_time: dict[str, Callable[[VisionTransformer, float], nn.Module]] | None = None,
) -> BenchResult:
    """Dense vs a pruning method at each setting vs the truncation bound, in one interleaved run.

    `keep_ratios` are the settings of the method's `bench_setting` (ToMe: r values). Weights are random
    (speed does not depend on them; no download). `also_time` maps a row name to a function building
    another contender from (an fp32 CPU copy of the dense model, setting), e.g. the authors' code
    (benchmarks/authors.py), timed in the same run. The truncation bound runs the dense blocks on the token
    counts each block's attention saw (ToMe and EViT also shrink the MLP inside a block, so for them
    it is only indicative). For DynamicViT a second bound adds the predictors' own matmuls to it
    (`predictor_bound_forward`: no top-k, no gather), reported as share of predictor bound.
    """
    from .engine import get_policy, sparsity_info
    from .flops import input_size
    from .policies.dynamicvit import DynamicViTPolicy
    from .policies.dynspatial import is_spatial_model
    from .policies.registry import get_method

    spec = get_method(method)
    torch.manual_seed(seed)
    name, dense = _build(model, img_size, None, spatial=method == "dynamicspatial")
    dense = dense.eval().to(device=device, dtype=dtype)
    images = torch.randn(batch_size, *input_size(dense), device=device, dtype=dtype)
    if is_spatial_model(dense):
        return _bench_spatial(
            name, dense, images, keep_ratios, method, rounds, warmup, device, dtype, progress
        )
    contenders: dict[str, Callable[[], object]] = {"dense": lambda: dense(images)}
    sparse_models = {}
    for ratio in keep_ratios:
        sparse = make_policy(method, ratio)(copy.deepcopy(dense)).eval().to(device=device, dtype=dtype)
        with torch.no_grad():
            sparse(images)
        counts = sparsity_info(sparse).tokens_per_block[0].tolist()
        sparse_models[ratio] = sparse
        contenders[f"{method}@{ratio}"] = lambda m=sparse: m(images)
        contenders[f"bound@{ratio}"] = lambda c=counts: truncated_forward(dense, images, c)
        policy = get_policy(sparse)
        if isinstance(policy, DynamicViTPolicy):
            contenders[f"predictor_bound@{ratio}"] = lambda c=counts, p=policy: predictor_bound_forward(
                dense, p, images, c
            )
        for other, build in (also_time or {}).items():
            theirs = build(copy.deepcopy(dense).float().cpu(), ratio).to(device=device, dtype=dtype)
            contenders[f"{other}@{ratio}"] = lambda m=theirs: m(images)
    timings = _time_all(contenders, f"bench {name} b{batch_size}", rounds, warmup, device, progress)
    seconds = {key: timing.median for key, timing in timings.items()}
    spread = {key: timing.spread for key, timing in timings.items()}
    dense_time = seconds["dense"]
    one_image = images[:1]  # pruning counts do not depend on the image
    rows = [
        BenchRow("dense", "-", _gflops(dense, one_image), batch_size / dense_time, 1.0, None, spread["dense"])
    ]
    for ratio, sparse in sparse_models.items():
        t = seconds[f"{method}@{ratio}"]
        bound = dense_time / seconds[f"bound@{ratio}"]
        label = spec.setting_label(ratio)
        predictor_key = f"predictor_bound@{ratio}"
        predictor_bound = dense_time / seconds[predictor_key] if predictor_key in seconds else None
        rows.append(
            BenchRow(
                method,
                label,
                _gflops(sparse, one_image),
                batch_size / t,
                dense_time / t,
                bound,
                spread=spread[f"{method}@{ratio}"],
                predictor_bound_speedup=predictor_bound,
                bound_spread=spread[f"bound@{ratio}"],
            )
        )

        for other in also_time or {}:
            t = seconds[f"{other}@{ratio}"]
            rows.append(
                BenchRow(
                    other,
                    label,
                    math.nan,
                    batch_size / t,
                    dense_time / t,
                    bound,
                    spread[f"{other}@{ratio}"],
                )
            )
    return _result(name, batch_size, device, dtype, rounds, rows)


def _bench_spatial(
    name, dense, images, keep_ratios, method, rounds, warmup, device, dtype, progress
) -> BenchResult:
    """Dense vs a dynamic ConvNeXt / Swin at each keep ratio; the bound is the ratio of executed FLOPs
    (no tokens are removed, so there is no truncated forward to time)."""
    batch_size = images.shape[0]
    contenders: dict[str, Callable[[], object]] = {"dense": lambda: dense(images)}
    sparse_models = {}
    for ratio in keep_ratios:
        sparse = make_policy(method, ratio)(copy.deepcopy(dense)).eval().to(device=device, dtype=dtype)
        sparse_models[ratio] = sparse
        contenders[f"{method}@{ratio}"] = lambda m=sparse: m(images)
    timings = _time_all(contenders, f"bench {name} b{batch_size}", rounds, warmup, device, progress)
    dense_time = timings["dense"].median
    dense_gflops = _gflops(dense, images[:1])
    rows = [BenchRow("dense", "-", dense_gflops, batch_size / dense_time, 1.0, None, timings["dense"].spread)]
    for ratio, sparse in sparse_models.items():
        timing = timings[f"{method}@{ratio}"]
        sparse_gflops = _gflops(sparse, images[:1])
        rows.append(
            BenchRow(method, f"keep_ratio={ratio}", sparse_gflops, batch_size / timing.median,
                     dense_time / timing.median, dense_gflops / sparse_gflops, spread=timing.spread)
        )  # fmt: skip
    return _result(name, batch_size, device, dtype, rounds, rows)


def mixed_batch(batch_size: int, img_size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Busy images (pixel noise) and plain ones (one flat colour each), alternating, busy first.

    Under A-ViT they halt at different depths, so a batch mixes long- and short-running images; a
    batch of one is a busy image.
    """
    g = torch.Generator().manual_seed(seed)
    plain = torch.zeros(batch_size, 3, *img_size) + 0.1 * torch.randn(batch_size, 3, 1, 1, generator=g)
    busy = torch.randn(batch_size, 3, *img_size, generator=g)
    pick = (torch.arange(batch_size) % 2 == 0).view(-1, 1, 1, 1)
    return torch.where(pick, busy, plain)


def bench_avit(
    model: str | nn.Module = "deit_tiny_patch16_224",
    gate_centers: Sequence[float] = (3.0,),
    gate_scale: float = 10.0,
    batch_size: int = 32,
    rounds: int = 10,
    warmup: int = 2,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    img_size: int | None = None,
    progress: bool = True,
    seed: int = 0,
) -> BenchResult:
    """Dense vs A-ViT on a batch mixing plain and busy images, in one interleaved run.

    The bound column is the ratio of executed FLOPs (dense / A-ViT: only tokens still running, in
    images whose class token still runs): the speedup a zero-overhead implementation would reach.
    """
    from .engine import sparsity_info
    from .policies.avit import avit

    torch.manual_seed(seed)
    name, dense = _build(model, img_size, None)
    dense = dense.eval().to(device=device, dtype=dtype)
    images = mixed_batch(batch_size, tuple(dense.patch_embed.img_size), seed).to(device=device, dtype=dtype)
    contenders: dict[str, Callable[[], object]] = {"dense": lambda: dense(images)}
    sparse_models = {}
    for center in gate_centers:
        sparse = avit(copy.deepcopy(dense), gate_scale=gate_scale, gate_center=center).eval()
        sparse_models[center] = sparse
        contenders[f"avit@{center}"] = lambda m=sparse: m(images)
        if batch_size == 1:  # one image: dense blocks on its token counts, up to its exit, are a bound
            with torch.no_grad():
                sparse(images)
            counts = [int(c) for c in sparsity_info(sparse).tokens_per_block[0].tolist()]
            contenders[f"trunc@{center}"] = lambda c=counts: truncated_forward(dense, images, c)
    timings = _time_all(contenders, f"bench {name} b{batch_size}", rounds, warmup, device, progress)
    seconds = {key: timing.median for key, timing in timings.items()}
    spread = {key: timing.spread for key, timing in timings.items()}
    dense_time = seconds["dense"]
    dense_gflops = _gflops(dense, images)
    rows = [BenchRow("dense", "-", dense_gflops, batch_size / dense_time, 1.0, None, spread["dense"])]
    for center, sparse in sparse_models.items():
        gflops = _gflops(sparse, images)  # per image halting: the whole batch is counted
        timed = [("avit", f"gate_scale={gate_scale:g}, gate_center={center:g}", f"avit@{center}")]
        if f"trunc@{center}" in seconds:
            timed.append(
                ("dense blocks on A-ViT's token counts", f"gate_center={center:g}", f"trunc@{center}")
            )
        for method, setting, key in timed:
            t = seconds[key]
            rows.append(
                BenchRow(
                    method,
                    setting,
                    gflops,
                    batch_size / t,
                    dense_time / t,
                    dense_gflops / gflops,
                    spread[key],
                )
            )
    return _result(name, batch_size, device, dtype, rounds, rows)


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
    from .training import json_safe  # a value not measured (NaN) is null: JSON has no NaN

    payload = {"command": command, "results": [r.to_dict() for r in results]}
    (folder / f"{stem}.json").write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")
    return str(folder / f"{stem}.md")
