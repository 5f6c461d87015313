"""The benchmarks the CLI and the scripts run: DynamicViT and the token methods, A-ViT, the spatial models."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.models.convnext import ConvNeXt
from timm.models.vision_transformer import VisionTransformer

from .results import BenchResult, BenchRow, _result
from .timing import (
    Timing,
    interleaved,
    mixed_batch,
    predictor_bound_forward,
    truncated_forward,
)


def _build(
    model: str | nn.Module, img_size: int | None, num_classes: int | None, spatial: bool = False
) -> tuple[str, nn.Module]:
    """(name, the dense timm model): a ViT for the token methods, a ConvNeXt / Swin for `spatial`."""
    import timm

    from ..policies.dynspatial import is_spatial_model

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
    if not spatial:
        from ..adapters import backbone_of

        try:
            backbone_of(built)
        except ValueError as err:
            hint = "; for a ConvNeXt / Swin use --method dynamicspatial" if is_spatial_model(built) else ""
            raise ValueError(
                f"--model {model} is a {type(built).__name__}, not a vision transformer tokensparse runs "
                f"(timm VisionTransformer, Eva or Beit, e.g. deit_small_patch16_224, eva02_small_patch14_224)"
                f"{hint}"
            ) from err
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
    from ..flops import model_flops

    return float(model_flops(copy.deepcopy(model).float().cpu(), images.float().cpu()).mean()) / 1e9


def make_policy(method: str, setting: float | None = None, **settings) -> Callable[[nn.Module], nn.Module]:
    """A function sparsifying a dense model with the registered `method`, its recipe's settings but its
    `bench_setting` (a keep ratio; r for ToMe) at `setting` (None: the recipe's) and the other
    `TrainConfig` fields in `settings` (e.g. target_gflops=, seed=)."""
    from ..config import TrainConfig
    from ..policies.registry import load_method

    spec = load_method(method)
    if spec.sparsify is None:
        raise ValueError(f"{method!r} sparsifies nothing; choose a token method")
    overrides = {} if setting is None or spec.bench_setting is None else {spec.bench_setting: setting}
    cfg = TrainConfig(method=method).with_settings(**overrides, **settings).resolved()
    build = spec.untrained or spec.sparsify
    return lambda m: build(m, cfg)


def bench_method(
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
    settings: dict | None = None,
    build: Callable[[nn.Module, Any], nn.Module] | None = None,
    mlp_bound: bool = False,
) -> BenchResult:
    """Dense vs a pruning method at each setting vs the truncation bound, in one interleaved run.

    `keep_ratios` are the settings of the method's `bench_setting` (ToMe: r values). Weights are random
    (speed does not depend on them; no download). `also_time` maps a row name to a function building
    another contender from (an fp32 CPU copy of the dense model, setting), e.g. the authors' code
    (benchmarks/authors.py), timed in the same run. The truncation bound runs the dense blocks on the token
    counts each block's attention saw (ToMe and EViT also shrink the MLP inside a block, so for them
    it is only indicative; `mlp_bound` also slices the bound's tokens between each block's attention
    and MLP as the method does, the tight bound). `settings`: the method's other settings (a run's
    locations, ...; default: its recipe). `build`: (dense model, setting) -> the sparse model, instead of
    the method's registered constructor at that setting. For DynamicViT a second bound adds the predictors' own matmuls to it
    (`predictor_bound_forward`: no top-k, no gather), reported as share of predictor bound.
    """
    from ..engine import get_policy, sparsity_info
    from ..flops import input_size
    from ..policies.dynamicvit import DynamicViTPolicy
    from ..policies.dynspatial import is_spatial_model
    from ..policies.registry import get_method

    spec = get_method(method)
    torch.manual_seed(seed)
    name, dense = _build(model, img_size, None, spatial=spec.architecture == "spatial")
    dense = dense.eval().to(device=device, dtype=dtype)
    images = torch.randn(batch_size, *input_size(dense), device=device, dtype=dtype)
    if is_spatial_model(dense):
        return _bench_spatial(
            name, dense, images, keep_ratios, method, rounds, warmup, device, dtype, progress
        )
    contenders: dict[str, Callable[[], object]] = {"dense": lambda: dense(images)}
    sparse_models = {}
    for ratio in keep_ratios:
        make = build or make_policy(method, ratio, **(settings or {}))
        sparse = (make(copy.deepcopy(dense), ratio) if build else make(copy.deepcopy(dense))).eval()
        sparse = sparse.to(device=device, dtype=dtype)
        with torch.no_grad():
            sparse(images)
        info = sparsity_info(sparse)
        counts = info.tokens_per_block[0].tolist()
        mlp = info.mlp_tokens[0].tolist() if mlp_bound else None
        sparse_models[ratio] = sparse
        contenders[f"{method}@{ratio}"] = lambda m=sparse: m(images)
        contenders[f"bound@{ratio}"] = lambda c=counts, m=mlp: truncated_forward(dense, images, c, m)
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
    from ..engine import sparsity_info
    from ..policies.avit import avit

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


bench_dynamicvit = bench_method
"""The former name of `bench_method` (it benches every method with a fixed token count per block)."""
