"""Make tests/golden/diffrate_official.safetensors by running the authors' DiffRate code (OpenGVLab/DiffRate).

Command that made the committed file (CPU, 2 cores, Linux x86_64, Python 3.11, torch 2.14.1; the
authors' timm version 0.4.5 (their README: "timm == 0.4.5"), installed into a side folder so that
it shadows the project's timm in this process only; the authors' repository at commit
91ae3e376e9c3f9f1e69f580fd902b61de5dfe0e exported from its git snapshot, never copied into this
project):

    pip install --no-deps --target /tmp/timm045 timm==0.4.5
    mkdir -p /tmp/diffrate_ref && git clone -q https://github.com/OpenGVLab/DiffRate /tmp/diffrate_ref
    PYTHONPATH=/tmp/timm045 python tests/golden_tools/make_diffrate_golden.py /tmp/diffrate_ref \
        tests/golden/diffrate_official.safetensors

(It also runs with timm 1.0.x, where a `drop_path` attribute is added to each block (their
`DiffRateBlock.forward` calls `self.drop_path`, which timm >= 0.9 renamed to `drop_path1/2`); with
timm 1.0.31 every stored tensor came out bit-identical.)

Shims, all in this process: stub package objects for `DiffRate` and `DiffRate.patch` (with their
`__path__` pointing into the authors' tree) so that `DiffRate.patch.deit`, `DiffRate.ddp`,
`DiffRate.merge` and `DiffRate.utils` are imported without running the packages' `__init__.py`,
which import `caformer.py` / `vis.py` (old timm layer paths, scipy, PIL; not used here).

The model is the golden ViT of the other reference files (image 112, patch 8 -> 14x14 = 196 patches,
dim 48, depth 12, 3 heads, MLP ratio 4, qkv bias, LayerNorm eps 1e-6, 10 classes), built as timm
0.4.5's `VisionTransformer` (DeiT = the plain class, class-token head, drop_path_rate 0) and patched
with their `DiffRate.patch.deit.apply_patch(model, trace_source=True, prune_granularity=4,
merge_granularity=4)` (granularity 4 = their `--granularity` default). Random weights with a fixed
seed (3; seeds 0 and 2 failed the gap checks below, 1 passed with smaller margins), drawn
variance-preserving as in make_evit_golden.py but with the qkv weights 1.5x (not 0.5x) the
1/sqrt(fan_in) scale, so that class attention is spread enough for stable cuts; rounded to
float16. The 4 input images are uint8 pixels, input = (pixels / 255 - 0.5) / 0.25 in float32.

Eval: for each setting (per-block kept token numbers, INCLUDING the class token, as their
`compression_rate.json` / `set_kept_num` represent them: `prune_kept_num[b]` tokens remain after
pruning in block b, `merge_kept_num[b]` after merging) their inference forward (`model.eval()`,
`set_kept_num`, `model(x)` -> (logits, flops)). The script checks, in eval and in the search forwards,
that at every prune and merge cut the class-attention values (mean over heads of the class row) on
the two sides differ by more than CUT_GAP relative to the kept one, that every merged token's best
and second-best cosine similarity differ by more than MERGE_GAP, that every eval token size is > 0,
and that in the search forwards the mask sums their code truncates with `.int()` are exact integers
and the unmasked tokens are the leading ones after every block (their cuts assume it); so an
implementation computing the same function in float32 makes the same decisions.

Search: `model.train()`, backbone frozen, their `DiffRate.selected_probability` parameters (the
architecture parameters, 2 per block) either at their initial value (zeros) or at fixed perturbed
values; one forward on the 4 images; their loss as in engine.py `train_one_epoch`:
loss = 5 * ((flops / 1e9) - target_flops) ** 2 + SoftTargetCrossEntropy(logits, targets), targets =
timm `mixup_target(labels, 10, lam=1, smoothing=0.1)` (what their Mixup gives for an unmixed batch);
gradients of each part (the total's is task + 5 * flops) w.r.t. every block's `prune_ddp.selected_probability` and
`merge_ddp.selected_probability`. target_flops = 3.0 (their `--target_flops` default, a ViT-S-DeiT
figure: ViT-S-DeiT is 4.6 G by their formula) scaled by (this model's dense FLOPs / ViT-S-DeiT's
dense FLOPs), both by their `calculate_flop_inference`.

See tests/golden/README.md for every key.

MAE (`--mae`, writes tests/golden/diffrate_mae_official.safetensors; about 10 s):

    PYTHONPATH=/tmp/timm045 python tests/golden_tools/make_diffrate_golden.py --mae /tmp/diffrate_ref \
        tests/golden/diffrate_mae_official.safetensors

The same golden-ViT shape built as their `models_mae.VisionTransformer(global_pool=True, ...)` (timm
0.4.5's class with the final norm removed and `fc_norm` after the pool: MAE's fine-tuned classifier,
what their `vit_base_patch16_mae` builds at ViT-B size), patched with their
`DiffRate.patch.mae.apply_patch(model, prune_granularity=4, merge_granularity=4)`, random weights
(seed 3 as above, `fc_norm.weight` drawn as the other norm weights), the same kind of pixels. Their
inference pool (`DiffRate/patch/mae.py` forward_features, lines 64-66) is the size-weighted mean of
the patch tokens, class token left out: sum_i size_i x_i / sum_i size_i over the final patch tokens.
Eval forwards at every count 197 and at their four "ViT-B-MAE" counts of `compression_rate.json`
(ViT-B-MAE has 12 blocks and 197 tokens, this model's shape), with the gap checks above. Keys:

- `model.*`, `pixels`: as above (plus `fc_norm.*`, without `norm.*`); they load into
  `timm.create_model("vit_small_patch16_224", img_size=112, patch_size=8, embed_dim=48, depth=12,
  num_heads=3, num_classes=10, global_pool="avg")`.
- `eval_logits.dense` (4, 10): their forward with every count 197 (equals timm's avg-pool ViT).
- for each budget `{g}` in 8.7, 10.0, 10.4, 11.5: `mae{g}.prune_kept`, `mae{g}.merge_kept` (12,)
  int64, `mae{g}.tokens_after` (12,) int64, `mae{g}.logits` (4, 10), `mae{g}.pooled` (4, 48): the
  pool's output before `fc_norm`, `mae{g}.final_size_sum` (4,): the sum of the final patch tokens'
  sizes (their pool's denominator), `mae{g}.flops` (1,) float64 (their `calculate_flop_inference`).
"""

from __future__ import annotations

import argparse
import math
import sys
import types
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

SEED = 3
DEPTH, DIM, HEADS, PATCHES = 12, 48, 3, 196
TOKENS = PATCHES + 1
GRANULARITY = 4  # their --granularity default
LABELS = (3, 7, 1, 9)
SMOOTHING = 0.1  # their --smoothing default (applied by Mixup's mixup_target)
LAMB = 5.0  # engine.py train_one_epoch: lamb = 5 (0 only in epoch 0 with --warmup_compression_rate)
DEFAULT_TARGET_G = 3.0  # their --target_flops default
CUT_GAP = 1e-4  # relative gap of the class-attention values on the two sides of every cut
MERGE_GAP = 1e-5  # gap between a merged token's best and second-best cosine similarity
QKV_SCALE = 1.5

# Per-block kept token numbers (class token included), as compression_rate.json writes them.
SETTINGS = {
    # compression_rate.json "ViT-S-DeiT" "3.1" (mild)
    0: (
        [197, 197, 194, 180, 160, 147, 137, 129, 115, 92, 76, 3],
        [197, 196, 186, 164, 150, 141, 133, 121, 103, 78, 68, 3],
    ),
    # compression_rate.json "ViT-S-DeiT" "2.3" (aggressive)
    1: (
        [197, 192, 168, 143, 121, 105, 92, 74, 62, 45, 33, 3],
        [197, 180, 156, 127, 109, 98, 80, 66, 52, 37, 31, 3],
    ),
    # compression_rate.json "ViT-T-DeiT" "1.0": not monotone (block 7 keeps 164 > 148 present, merges
    # to 156 > 148 present: nothing happens there)
    2: (
        [197, 197, 196, 194, 188, 184, 178, 164, 156, 137, 129, 21],
        [197, 197, 196, 190, 186, 154, 148, 156, 145, 135, 125, 21],
    ),
}
# Perturbed search start: expected kept patches (class token excluded) per block, prune and merge.
PERTURB_PRUNE = [None, 188, 170, 150, 130, 112, 96, 80, 66, 52, 40, 10]
PERTURB_MERGE = [None, 180, 160, 140, 122, 104, 88, 72, 60, 46, 34, 4]
PERTURB_WIDTH = 16.0
PERTURB_NOISE = 0.5


def import_authors(repo: Path):
    """Import their DiffRate.patch.deit without running DiffRate/__init__.py (caformer, vis imports)."""
    repo = repo.resolve()
    sys.path.insert(0, str(repo))
    for name, sub in (("DiffRate", "DiffRate"), ("DiffRate.patch", "DiffRate/patch")):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(repo / sub)]
            sys.modules[name] = pkg
    import DiffRate.patch.deit as deit_patch  # noqa: PLC0415  (the authors' module)

    if not deit_patch.__file__.startswith(str(repo)):
        raise RuntimeError(f"imported {deit_patch.__file__}, not the authors' tree at {repo}")
    return deit_patch


def import_mae(repo: Path):
    """Their DiffRate.patch.mae and models_mae (after `import_authors`, which stubs the packages)."""
    import DiffRate.patch.mae as mae_patch  # noqa: PLC0415  (the authors' module)
    import models_mae  # noqa: PLC0415  (the authors' MAE ViT, from their repository root)

    for module in (mae_patch, models_mae):
        if not module.__file__.startswith(str(repo.resolve())):
            raise RuntimeError(f"imported {module.__file__}, not the authors' tree at {repo}")
    return mae_patch, models_mae


def build(deit_patch) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer  # noqa: PLC0415

    model = VisionTransformer(
        img_size=112,
        patch_size=8,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_classes=10,
        drop_path_rate=0.0,
    )
    for block in model.blocks:  # timm >= 0.9 calls it drop_path1/drop_path2; their code uses drop_path
        if not hasattr(block, "drop_path"):
            block.drop_path = nn.Identity()
    return model


def random_state(model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Variance-preserving random weights for every parameter, rounded to float16."""
    state = {}
    for name, value in model.state_dict().items():
        if (
            name.endswith("norm1.weight")
            or name.endswith("norm2.weight")
            or name in ("norm.weight", "fc_norm.weight")
        ):
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


class Recorder:
    """Hooks that record, per block, the sorted class attention (for gap checks), merge gaps, the
    mask sum their training code truncates with .int(), and token sizes / sources after the block."""

    def __init__(self, model, deit_patch):
        self.model = model
        self.deit_patch = deit_patch
        self.hooks = []
        self.reset()
        for block in model.blocks:
            self.hooks.append(block.attn.register_forward_hook(self._attn_hook))
            self.hooks.append(block.register_forward_pre_hook(self._pre_hook))
            self.hooks.append(block.register_forward_hook(self._post_hook))
        self._orig_merge = deit_patch.get_merge_func
        deit_patch.get_merge_func = self._merge_wrapper  # DiffRateBlock.forward looks it up here

    def reset(self):
        self.cls_sorted, self.merge_gaps, self.mask_sums, self.sizes, self.sources, self.counts = (
            [],
            [],
            [],
            [],
            [],
            [],
        )
        self.mask_prefix = []  # training: are the unmasked tokens exactly the first ones (per image)?

    def close(self):
        for hook in self.hooks:
            hook.remove()
        self.deit_patch.get_merge_func = self._orig_merge

    def _attn_hook(self, module, inputs, output):
        attn = output[1].detach()
        cls_attn = attn[:, :, 0, 1:].mean(dim=1)
        self.cls_sorted.append(cls_attn.sort(dim=1, descending=True).values)

    def _pre_hook(self, module, inputs):
        mask = self.model._diffrate_info["mask"]
        self.mask_sums.append(float(mask[0].sum()))
        self.merge_gaps.append(math.inf)

    def _post_hook(self, module, inputs, output):
        info = self.model._diffrate_info
        if module.training:
            mask = info["mask"].detach()
            n = round(float(mask[0].sum()))
            self.mask_prefix.append(bool((mask[:, :n] != 0).all() and (mask[:, n:] == 0).all()))
        self.counts.append(output.shape[1])
        self.sizes.append(info["size"].detach().clone())
        if info["trace_source"] and info["source"] is not None:
            self.sources.append(info["source"].detach().clone())

    def _merge_wrapper(self, metric, kept_number, class_token=True):
        with torch.no_grad():
            m = metric / metric.norm(dim=-1, keepdim=True)
            sim = m[:, kept_number:] @ m[:, :kept_number].transpose(-1, -2)
            if class_token:
                sim[..., :, 0] = -math.inf
            if sim.shape[1] > 0 and sim.shape[2] > 1:
                top = sim.topk(2, dim=-1).values
                self.merge_gaps[-1] = min(self.merge_gaps[-1], float((top[..., 0] - top[..., 1]).min()))
        return self._orig_merge(metric, kept_number, class_token)


def cut_gap(cls_sorted: torch.Tensor, cut: int) -> float:
    """Relative gap between the class attention of the last token kept and of the first token cut
    when `cut` tokens (class token at position 0 included) stay on the kept side."""
    n = cls_sorted.shape[1] + 1
    if cut >= n or cut <= 1:
        return math.inf
    kept, cut_off = cls_sorted[:, cut - 2], cls_sorted[:, cut - 1]
    return float(((kept - cut_off) / kept).min())


def owners_and_sizes(source: torch.Tensor, size: torch.Tensor):
    """Order-free view of the tokens after a block. `owner` (B, 197): for every input token t
    (0 = class token, 1..196 = patches row-major) the smallest input index in the output token that
    contains t, -1 if t was pruned. `sizes` (B, N_out): the output tokens' sizes, ordered by that
    smallest input index (so the class token's size comes first)."""
    present = source > 0  # (B, N_out, 197)
    group_min = present.float().argmax(dim=-1)  # first input token of each output token
    has = present.any(dim=1)  # (B, 197)
    where = present.float().argmax(dim=1)  # which output token holds t
    owner = torch.where(has, group_min.gather(1, where), torch.full_like(where, -1))
    order = group_min.argsort(dim=1)
    sizes = size[..., 0].gather(1, order)
    return owner.to(torch.int16), sizes.float()


def dense_flops_g(model_cls, embed_dim: int, patch: int, num_patches: int, num_classes: int) -> float:
    """Their calculate_flop_inference on a dense model of the given shape (no blocks compress)."""
    ns = types.SimpleNamespace
    blocks = [
        ns(
            prune_ddp=ns(kept_token_number=num_patches + 1, selected_probability=torch.zeros(1)),
            merge_ddp=ns(kept_token_number=num_patches + 1),
        )
        for _ in range(12)
    ]
    fake = ns(
        embed_dim=embed_dim,
        patch_embed=ns(num_patches=num_patches, patch_size=(patch, patch)),
        num_classes=num_classes,
        blocks=blocks,
    )
    return float(model_cls.calculate_flop_inference(fake)) / 1e9


def perturbed_logits(model, generator):
    values = {}
    for b, block in enumerate(model.blocks):
        for kind, targets in (("prune", PERTURB_PRUNE), ("merge", PERTURB_MERGE)):
            ddp = getattr(block, f"{kind}_ddp")
            cand = ddp.kept_token_candidate.detach()
            if targets[b] is None:
                values[(b, kind)] = torch.zeros_like(cand)
            else:
                z = -0.5 * ((cand - targets[b]) / PERTURB_WIDTH) ** 2
                values[(b, kind)] = z + PERTURB_NOISE * torch.randn(cand.shape, generator=generator)
    return values


def run_search(model, rec, images, targets, target_g, start, tag, out):
    from timm.loss import SoftTargetCrossEntropy  # noqa: PLC0415  (their criterion with mixup on)

    arch = []
    with torch.no_grad():
        for b, block in enumerate(model.blocks):
            for kind in ("prune", "merge"):
                p = getattr(block, f"{kind}_ddp").selected_probability
                p.copy_(start[(b, kind)])
                arch.append((f"blocks.{b}.{kind}_ddp.selected_probability", p))
                out[f"search.{tag}.param.blocks.{b}.{kind}_ddp.selected_probability"] = p.detach().clone()
    model.train()
    rec.reset()
    logits, flops = model(images)
    loss_cls = SoftTargetCrossEntropy()(logits, targets)
    loss_flops = ((flops / 1e9) - target_g) ** 2
    loss = LAMB * loss_flops + loss_cls
    params = [p for _, p in arch]
    grads = {}
    for part, value in (("task", loss_cls), ("flops", loss_flops)):  # total = task + LAMB * flops
        g = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        grads[part] = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)]
    info = model._diffrate_info
    prune = torch.stack([t.detach().float().reshape(()) for t in info["prune_kept_num"]])
    merge = torch.stack([t.detach().float().reshape(()) for t in info["merge_kept_num"]])
    # gap checks at the cuts their training forward made (see DiffRateBlock.forward, training branch)
    gaps = []
    for b in range(DEPTH):
        last = int(rec.mask_sums[b])  # their mask[0].sum().int()
        pk = int(prune[b])
        mid = min(last, pk)
        if pk < last:
            gaps.append(cut_gap(rec.cls_sorted[b], pk))
        if int(merge[b]) < mid:
            gaps.append(cut_gap(rec.cls_sorted[b], int(merge[b])))
    merge_gap = min(rec.merge_gaps)
    frac = [abs(s - round(s)) for s in rec.mask_sums]
    print(
        f"search.{tag}: loss {loss.item():.6f} task {loss_cls.item():.6f} flops_term {loss_flops.item():.3e}"
        f" flops {float(flops) / 1e9:.6f} G; prune {prune.int().tolist()} merge {merge.int().tolist()}"
        f"; unmasked before each block {rec.mask_sums}; smallest cut gap {min(gaps):.3e}"
        f" merge gap {merge_gap:.3e}"
    )
    problems = []
    if min(gaps) <= CUT_GAP or merge_gap <= MERGE_GAP:
        problems.append(f"search.{tag}: cut gap {min(gaps):.2e} or merge gap {merge_gap:.2e} too small")
    if not all(rec.mask_prefix):
        problems.append(f"search.{tag}: after a block the unmasked tokens are not the leading ones")
    if max(frac) > 1e-4 or any(s < round(s) for s in rec.mask_sums):
        problems.append(f"search.{tag}: a mask sum in {rec.mask_sums} is not safely >= an integer")
    out[f"search.{tag}.logits"] = logits.detach().contiguous()
    out[f"search.{tag}.loss"] = loss.detach().reshape(1)
    out[f"search.{tag}.loss_task"] = loss_cls.detach().reshape(1)
    out[f"search.{tag}.loss_flops"] = loss_flops.detach().reshape(1).float()
    out[f"search.{tag}.flops"] = torch.as_tensor(float(flops), dtype=torch.float64).reshape(1)
    out[f"search.{tag}.prune_kept_num"] = prune.to(torch.int64)
    out[f"search.{tag}.merge_kept_num"] = merge.to(torch.int64)
    out[f"search.{tag}.unmasked_before"] = torch.tensor([round(s) for s in rec.mask_sums], dtype=torch.int64)
    for part, gs in grads.items():
        for (name, _), g in zip(arch, gs):
            out[f"search.{tag}.grad_{part}.{name}"] = g.detach().clone()
    return problems


def generate(deit_patch, seed: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """All golden tensors for one seed, and the list of failed checks (empty when usable)."""
    problems: list[str] = []
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build(deit_patch)
    state = random_state(model, generator)
    pixels = torch.randint(0, 256, (4, 3, 112, 112), generator=generator, dtype=torch.uint8)
    images = (pixels.float() / 255 - 0.5) / 0.25
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    deit_patch.apply_patch(
        model, trace_source=True, prune_granularity=GRANULARITY, merge_granularity=GRANULARITY
    )
    for p in model.parameters():  # their parameters(): the backbone, without the *_ddp parameters
        p.requires_grad_(False)
    rec = Recorder(model, deit_patch)

    out = {f"model.{k}": v for k, v in state.items()}
    out["pixels"] = pixels

    # ---- eval ----
    model.eval()
    dense = [TOKENS] * DEPTH
    model.set_kept_num(dense, dense)
    with torch.no_grad():
        logits, flops = model(images)
    out["eval_logits.dense"] = logits.contiguous()
    out["eval_flops.dense"] = torch.as_tensor(float(flops), dtype=torch.float64).reshape(1)
    for k, (prune, merge) in SETTINGS.items():
        model.set_kept_num(prune, merge)
        rec.reset()
        with torch.no_grad():
            logits, flops = model(images)
        gaps, n = [], TOKENS
        for b in range(DEPTH):
            if prune[b] < n:
                gaps.append(cut_gap(rec.cls_sorted[b], prune[b]))
            if merge[b] < min(n, prune[b]):
                gaps.append(cut_gap(rec.cls_sorted[b], merge[b]))
            n = rec.counts[b]
        merge_gap = min(rec.merge_gaps)
        print(
            f"setting{k}: tokens after each block {rec.counts}, flops {float(flops) / 1e9:.6f} G,"
            f" smallest cut gap {min(gaps):.3e} merge gap {merge_gap:.3e}"
        )
        if min(gaps) <= CUT_GAP or merge_gap <= MERGE_GAP:
            problems.append(f"setting{k}: cut gap {min(gaps):.2e} or merge gap {merge_gap:.2e} too small")
        if not all(bool((s > 0).all()) for s in rec.sizes):
            problems.append(f"setting{k}: a token size <= 0 (their eval sizes are not clamped)")
        owners, sizes = zip(*(owners_and_sizes(src, sz) for src, sz in zip(rec.sources, rec.sizes)))
        out[f"setting{k}.prune_kept"] = torch.tensor(prune, dtype=torch.int64)
        out[f"setting{k}.merge_kept"] = torch.tensor(merge, dtype=torch.int64)
        out[f"setting{k}.tokens_after"] = torch.tensor(rec.counts, dtype=torch.int64)
        out[f"eval_logits.setting{k}"] = logits.contiguous()
        out[f"eval_flops.setting{k}"] = torch.as_tensor(float(flops), dtype=torch.float64).reshape(1)
        out[f"eval_owner.setting{k}"] = torch.stack(owners).contiguous()
        out[f"eval_size.setting{k}"] = torch.cat(sizes, dim=1).contiguous()

    # ---- search ----
    dense_small = dense_flops_g(type(model), DIM, 8, PATCHES, 10)
    dense_deit_s = dense_flops_g(type(model), 384, 16, 196, 1000)
    target_g = DEFAULT_TARGET_G * dense_small / dense_deit_s
    print(
        f"dense FLOPs: this model {dense_small:.6f} G, ViT-S-DeiT {dense_deit_s:.6f} G; target {target_g:.6f} G"
    )
    labels = torch.tensor(LABELS)
    off = SMOOTHING / 10
    targets = torch.full((4, 10), off).scatter_(1, labels[:, None], 1.0 - SMOOTHING + off)
    out["search.labels"] = labels
    out["search.targets"] = targets
    out["search.target_flops"] = torch.tensor([target_g], dtype=torch.float64)
    out["search.lamb"] = torch.tensor([LAMB])
    zeros = {
        (b, kind): torch.zeros_like(getattr(block, f"{kind}_ddp").selected_probability)
        for b, block in enumerate(model.blocks)
        for kind in ("prune", "merge")
    }
    problems += run_search(model, rec, images, targets, target_g, zeros, "init", out)
    start = perturbed_logits(model, generator)
    problems += run_search(model, rec, images, targets, target_g, start, "perturbed", out)
    rec.close()
    return out, problems


MAE_SETTINGS = {  # compression_rate.json "ViT-B-MAE"
    "8.7": (
        [197, 192, 166, 143, 119, 103, 86, 72, 54, 43, 37, 23],
        [197, 176, 150, 127, 107, 92, 76, 58, 47, 41, 23, 23],
    ),
    "10.0": (
        [197, 194, 173, 154, 135, 120, 108, 92, 76, 64, 52, 40],
        [197, 181, 160, 141, 122, 116, 95, 80, 67, 60, 40, 40],
    ),
    "10.4": (
        [197, 195, 179, 159, 140, 122, 105, 100, 89, 71, 56, 45],
        [197, 187, 166, 145, 125, 109, 102, 97, 75, 64, 45, 45],
    ),
    "11.5": (
        [197, 196, 182, 172, 162, 147, 131, 109, 101, 94, 70, 49],
        [197, 192, 178, 164, 150, 133, 115, 101, 96, 82, 49, 49],
    ),
}


def generate_mae(deit_patch, mae_patch, models_mae, seed: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The MAE golden tensors (their `models_mae.VisionTransformer` with the global pool, patched by
    `DiffRate.patch.mae`) for one seed, and the list of failed checks."""
    problems: list[str] = []
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = models_mae.VisionTransformer(
        global_pool=True,
        img_size=112,
        patch_size=8,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_classes=10,
        drop_path_rate=0.0,
    )
    for block in model.blocks:  # as `build`: timm >= 0.9 has drop_path1/drop_path2
        if not hasattr(block, "drop_path"):
            block.drop_path = nn.Identity()
    state = random_state(model, generator)
    pixels = torch.randint(0, 256, (4, 3, 112, 112), generator=generator, dtype=torch.uint8)
    images = (pixels.float() / 255 - 0.5) / 0.25
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    mae_patch.apply_patch(model, prune_granularity=GRANULARITY, merge_granularity=GRANULARITY)
    for p in model.parameters():
        p.requires_grad_(False)
    rec = Recorder(model, deit_patch)  # their MAE blocks are deit.py's DiffRateBlock
    pooled: list[torch.Tensor] = []
    model.fc_norm.register_forward_pre_hook(lambda module, inputs: pooled.append(inputs[0].detach().clone()))

    out = {f"model.{k}": v for k, v in state.items()}
    out["pixels"] = pixels
    model.eval()
    model.set_kept_num([TOKENS] * DEPTH, [TOKENS] * DEPTH)
    with torch.no_grad():
        logits, _ = model(images)
    out["eval_logits.dense"] = logits.contiguous()
    for g, (prune, merge) in MAE_SETTINGS.items():
        model.set_kept_num(prune, merge)
        rec.reset()
        pooled.clear()
        with torch.no_grad():
            logits, flops = model(images)
        gaps, n = [], TOKENS
        for b in range(DEPTH):
            if prune[b] < n:
                gaps.append(cut_gap(rec.cls_sorted[b], prune[b]))
            if merge[b] < min(n, prune[b]):
                gaps.append(cut_gap(rec.cls_sorted[b], merge[b]))
            n = rec.counts[b]
        merge_gap = min(rec.merge_gaps)
        final_size = rec.sizes[-1][:, 1:, 0].sum(dim=1)
        print(
            f"mae {g}: tokens after each block {rec.counts}, flops {float(flops) / 1e9:.6f} G, smallest cut gap "
            f"{min(gaps):.3e} merge gap {merge_gap:.3e}, final size sums {final_size.tolist()}"
        )
        if min(gaps) <= CUT_GAP or merge_gap <= MERGE_GAP:
            problems.append(f"mae {g}: cut gap {min(gaps):.2e} or merge gap {merge_gap:.2e} too small")
        if not all(bool((s > 0).all()) for s in rec.sizes):
            problems.append(f"mae {g}: a token size <= 0 (their eval sizes are not clamped)")
        out[f"mae{g}.prune_kept"] = torch.tensor(prune, dtype=torch.int64)
        out[f"mae{g}.merge_kept"] = torch.tensor(merge, dtype=torch.int64)
        out[f"mae{g}.tokens_after"] = torch.tensor(rec.counts, dtype=torch.int64)
        out[f"mae{g}.logits"] = logits.contiguous()
        out[f"mae{g}.pooled"] = pooled[-1].contiguous()
        out[f"mae{g}.final_size_sum"] = final_size.contiguous()
        out[f"mae{g}.flops"] = torch.as_tensor(float(flops), dtype=torch.float64).reshape(1)
    rec.close()
    return out, problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("diffrate_repo", type=Path, help="exported OpenGVLab/DiffRate tree")
    parser.add_argument("out", type=Path, help="safetensors file to write")
    parser.add_argument("--seed", type=int, default=SEED, help=f"weight and input seed (default {SEED})")
    parser.add_argument(
        "--mae", action="store_true", help="their MAE model and patch (global pool), not DeiT"
    )
    args = parser.parse_args()
    deit_patch = import_authors(args.diffrate_repo)
    import timm  # noqa: PLC0415

    print("timm", timm.__version__, timm.__file__, "torch", torch.__version__)
    if args.mae:
        out, problems = generate_mae(deit_patch, *import_mae(args.diffrate_repo), args.seed)
    else:
        out, problems = generate(deit_patch, args.seed)
    if problems:
        raise SystemExit("; ".join(problems) + "; pick another --seed")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(args.out), metadata={"timm": timm.__version__, "seed": str(args.seed)})
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {len(out)} tensors)")


if __name__ == "__main__":
    main()
