"""Make tests/golden/evit_official.safetensors by running the authors' EViT code (youweiliang/evit).

Command that made the committed file (CPU, torch 2.x, timm 1.0.31; the authors' repository exported
from its git snapshot, never copied into this project):

    mkdir -p /tmp/evit_ref && git clone -q https://github.com/youweiliang/evit /tmp/evit_ref
    python tests/golden_tools/make_evit_golden.py /tmp/evit_ref \
        tests/golden/evit_official.safetensors

The model is the golden ViT of the other reference files (image 112, patch 8 -> 14x14 = 196 patches,
dim 48, depth 12, 3 heads, MLP ratio 4, qkv bias, LayerNorm eps 1e-6, 10 classes), built with the
authors' `evit.EViT` class with keep_rate r at blocks 3, 6, 9 and 1 elsewhere (their
`deit_*_shrink_base` models), fuse_token on and off. Random weights with a fixed seed (2, the default
`--seed`; seeds 1 and 3-7 failed the gap check below), drawn variance-preserving so that class
attention is peaked enough for a stable ranking: the script checks
that at every stage the last kept and the first dropped class-attention value differ by more than
`MIN_GAP`, so an implementation computing the same function picks the same tokens. Weights are
rounded to float16 and the 4 input images are uint8 pixels (input = (pixels / 255 - 0.5) / 0.25)
to keep the file small; the authors' code runs on those exact values in float32.

Stored (see tests/golden/README.md): `model.*` float16 state dict (timm's VisionTransformer keys),
`pixels` (4, 3, 112, 112) uint8, `eval_logits.rho{r}.fuse{f}` (4, 10) float32, and
`eval_kept.rho{r}.fuse{f}.stage{s}` (4, k_s) int64: the tokens the stage keeps, as original patch
indices 0..195 ascending, 196 standing for a fused token of an earlier stage that was ranked and kept.
"""

from __future__ import annotations

import argparse
import math
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

SEED = 2
KEEP_RATES = (0.7, 0.5)
LOCATIONS = (3, 6, 9)
DEPTH, DIM, HEADS, PATCHES = 12, 48, 3, 196
MIN_GAP = 1e-6
QKV_SCALE = 0.5


def import_authors(repo: Path):
    """Import the authors' evit.py from `repo` (their helpers.py imports torchprofile, unused here)."""
    if "torchprofile" not in sys.modules:
        stub = types.ModuleType("torchprofile")
        stub.profile_macs = None
        sys.modules["torchprofile"] = stub
    sys.path.insert(0, str(repo))
    import evit  # noqa: PLC0415  (the authors' module)

    return evit


def random_state(model: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Variance-preserving random weights for every parameter, rounded to float16."""
    state = {}
    for name, value in model.state_dict().items():
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
            new = 1.0 + 0.2 * torch.randn(value.shape, generator=generator)
        elif value.ndim == 1:  # biases and norm shifts
            new = 0.1 * torch.randn(value.shape, generator=generator)
        elif name in ("cls_token", "pos_embed"):
            new = 0.5 * torch.randn(value.shape, generator=generator)
        else:  # linear and conv weights: std 1/sqrt(fan_in), qkv a bit larger for peaked attention
            fan_in = value[0].numel()
            scale = QKV_SCALE if name.endswith("attn.qkv.weight") else 1.0
            new = scale * torch.randn(value.shape, generator=generator) / math.sqrt(fan_in)
        state[name] = new.to(torch.float16)
    return state


def run(evit, state, images, keep_rate: float, fuse: bool):
    rates = [1.0] * DEPTH
    for loc in LOCATIONS:
        rates[loc] = keep_rate
    model = evit.EViT(
        img_size=112,
        patch_size=8,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        num_classes=10,
        keep_rate=tuple(rates),
        fuse_token=fuse,
    ).eval()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    gaps, hooks = [], []

    def record(module, inputs, output):
        _, index, _, cls_attn, left = output
        if index is not None:
            ranked = cls_attn.sort(dim=1, descending=True).values
            gaps.append((ranked[:, left - 1] - ranked[:, left]).min().item())

    for block in model.blocks:
        hooks.append(block.attn.register_forward_hook(record))
    with torch.no_grad():
        logits, idxs = model(images, get_idx=True)
    for hook in hooks:
        hook.remove()
    # idx at each stage indexes the non-class tokens present there; follow them back to patches.
    ids = torch.arange(PATCHES).expand(images.shape[0], -1)
    kept = []
    for idx in idxs:
        ids = ids.gather(1, idx)
        kept.append(ids.sort(dim=1).values)
        if fuse:
            ids = torch.cat([ids, torch.full((ids.shape[0], 1), PATCHES)], dim=1)
    return logits, kept, gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("evit_repo", type=Path, help="directory holding the authors' evit.py and helpers.py")
    parser.add_argument("out", type=Path, help="safetensors file to write")
    parser.add_argument("--seed", type=int, default=SEED, help=f"weight and input seed (default {SEED})")
    args = parser.parse_args()
    evit = import_authors(args.evit_repo)
    torch.manual_seed(args.seed)  # the authors' constructor draws its own init (replaced below)
    generator = torch.Generator().manual_seed(args.seed)
    template = evit.EViT(
        img_size=112, patch_size=8, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=10
    )
    state = random_state(template, generator)
    pixels = torch.randint(0, 256, (4, 3, 112, 112), generator=generator, dtype=torch.uint8)
    images = (pixels.float() / 255 - 0.5) / 0.25
    out = {f"model.{k}": v for k, v in state.items()}
    out["pixels"] = pixels
    for rate in KEEP_RATES:
        for fuse in (True, False):
            logits, kept, gaps = run(evit, state, images, rate, fuse)
            tag = f"rho{rate}.fuse{int(fuse)}"
            print(tag, "kept per stage", [k.shape[1] for k in kept], "smallest ranking gap", min(gaps))
            if min(gaps) <= MIN_GAP:
                raise SystemExit(f"{tag}: a ranking gap {min(gaps):.2e} <= {MIN_GAP}; pick another SEED")
            out[f"eval_logits.{tag}"] = logits.contiguous()
            for s, k in enumerate(kept):
                out[f"eval_kept.{tag}.stage{s}"] = k.contiguous()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(args.out))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
