"""The measurement: paired, interleaved timing, the truncation and predictor bounds, the machine."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from ..checks import DTYPE_NAMES

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


class _Prefix:
    """The token positions of a truncated sequence: its first patches, as a family's block views read them."""

    def __init__(self, batch: int, num_prefix: int, num_patches: int, device: torch.device):
        self.num_prefix, self.num_patches = num_prefix, num_patches
        self.all = torch.arange(num_patches, device=device).expand(batch, -1)
        self.patch_index = self.all

    def keep(self, tokens: int) -> None:
        self.patch_index = self.all[:, : tokens - self.num_prefix]


@torch.no_grad()
def truncated_forward(
    model: nn.Module,
    images: torch.Tensor,
    tokens_per_block: Sequence[int],
    mlp_tokens: Sequence[int] | None = None,
) -> torch.Tensor:
    """The dense model with its sequence sliced to `tokens_per_block[i]` tokens before block i (and to
    `mlp_tokens[i]` between block i's attention and its MLP, for methods that reduce tokens there).

    No scoring, no gather: the speed of pruning with zero overhead, the bound a pruning method can reach.
    A count of 0 stops there (the image exited early, as A-ViT's does): the head reads the tokens as
    the last block that ran left them. Runs any backbone family (`tokensparse.adapters`): a kept token
    keeps its position (rotary rows, relative-position bias).
    """
    from ..adapters import backbone_of
    from ..attention import add_attention, attention_parts, mlp_tail

    backbone = backbone_of(model)
    x, context = backbone.embed(images)
    positions = _Prefix(x.shape[0], backbone.num_prefix, x.shape[1] - backbone.num_prefix, x.device)
    blocks = backbone.views(positions, context)
    for i, (block, tokens) in enumerate(zip(blocks, tokens_per_block)):
        if tokens == 0:
            break
        if tokens < x.shape[1]:
            x = x[:, :tokens]
            positions.keep(tokens)
        if mlp_tokens is None or mlp_tokens[i] >= x.shape[1]:
            x = block(x)
        else:
            h = block.norm1(x)
            out = block.attn(h) if isinstance(block.attn, nn.Module) else attention_parts(block.attn, h)[0]
            x = add_attention(block, x, out)
            x = mlp_tail(block, x[:, : mlp_tokens[i]])
            positions.keep(mlp_tokens[i])
    return model.forward_head(backbone.final_norm(x))


@torch.no_grad()
def predictor_bound_forward(
    model: VisionTransformer, predictors: nn.ModuleList, images: torch.Tensor, tokens_per_block: Sequence[int]
) -> torch.Tensor:
    """`truncated_forward` plus DynamicViT's predictor MLPs, run on the patch tokens before each location.

    The predictors' own matmuls but no top-k, sort or gather: the bound of a DynamicViT whose token
    selection costs nothing. `predictors` is a DynamicViT policy (`model.score_predictor` of a
    DynamicViT), read for its `locations` and per-stage `keep_score`.
    """
    from ..adapters import backbone_of

    backbone = backbone_of(model)
    prefix = backbone.num_prefix
    x, context = backbone.embed(images)
    positions = _Prefix(x.shape[0], prefix, x.shape[1] - prefix, x.device)
    for index, (block, tokens) in enumerate(zip(backbone.views(positions, context), tokens_per_block)):
        if index in predictors.locations:
            predictors[predictors.locations.index(index)].keep_score(x[:, prefix:])
        if tokens < x.shape[1]:
            x = x[:, :tokens]
            positions.keep(tokens)
        x = block(x)
    return model.forward_head(backbone.final_norm(x))


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
