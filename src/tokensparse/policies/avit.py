"""A-ViT (Yin et al., CVPR 2022): each token halts once it has been computed enough. No new parameters.

After every block a token's halting score is h = sigmoid(gate_scale * y[0] - gate_center), read from
channel 0 of the block's output (h = 1 at the last block). Scores accumulate in c; a token halts at
the first block where c > 1 - eps. Its output is the sum of its block outputs weighted by h, the
halting block weighted by the remainder R = 1 - (sum of the earlier h); its ponder cost is blocks
used + R. The final norm and head read the class token of these sums. The class token halts too.

- Training (mask regime): the authors' formulation. Every token stays in the tensor; a halted token
  is zeroed as block input and masked as an attention key (logit bias -1000). Differentiable (the
  ponder cost through R) and as costly as the dense model. The input zeroing passes the gradient
  unchanged, as the authors' `.data` product does (`straight_through_zeroing`). The per-block mean
  halting score (the distributional prior's input) averages all images; the authors' code drops
  image 0 (`h[1:]`, a slip not reproduced).
- Inference (gather regime): halted tokens leave the computation. The live tokens of all images form
  one pack (T, C) for norms, linears and MLP; attention runs per image on a padded copy with a key
  mask (`attention.packed_block`). The pack shrinks after blocks where tokens halted. With
  `early_exit`, an image whose head tokens (class token, and distillation token) have all halted
  leaves the pack: its logits can no longer change.

Per-image statistics of the last forward: `avit_stats(model)` (also in `sparsity_info(model).extra`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from ..attention import PackedLayout, halting_block, packed_block
from ..checks import check_flag, check_number
from ..engine import (
    SparseInfo,
    TokenPolicy,
    TokenState,
    check_model,
    check_vit,
    no_extra_flops,
    policy_stats,
    sparsify,
)
from .avit_state import (
    CUMULATIVE,
    HEAD,
    IMAGE,
    ONE,
    PONDER_STEP,
    POSITION,
    REMAINDER,
    HaltingStats,
    _head_tokens,
    _MaskedRun,
    _PackedRun,
)
from .registry import DISTILL_WEIGHT, Method, Setting, register_method

if TYPE_CHECKING:
    from ..config import TrainConfig

MASKED_KEY_BIAS = -1000.0


class AViTPolicy(TokenPolicy, nn.Module):
    """The halting rule of A-ViT; holds its settings and no parameters.

    gate_scale, gate_center, eps, early_exit (default True) and straight_through_zeroing (default True)
    as in `avit`, which checks them and gives the paper's defaults (gate_scale 10, gate_center 30, eps
    0.01: A-ViT's DeiT-T setting, Yin et al. 2022)."""

    method = "avit"

    map_kind = "depth"

    def map_heading(self, model: nn.Module, info: SparseInfo) -> str:
        mean = float(info.extra["token_depth"][:, info.num_prefix :].float().mean())
        return (f"A-ViT, gate centre {self.gate_center:g}: blocks each patch computed before it halted "
                f"(mean {mean:.1f} of {len(model.blocks)})")  # fmt: skip

    def export_refusal(self) -> str | None:
        return (
            "A-ViT cannot be exported to ONNX or compiled with fullgraph=True: its inference removes halted "
            "tokens, so every block's token count depends on the image's values (data-dependent shapes), "
            "which a static graph cannot hold. Run it eagerly (tokensparse.avit), or export a method with "
            "fixed token counts (dynamicvit, evit, random, static, tome)"
        )

    def __init__(
        self,
        gate_scale: float,
        gate_center: float,
        eps: float,
        early_exit: bool = True,
        straight_through_zeroing: bool = True,
    ):
        super().__init__()
        self.gate_scale = float(gate_scale)
        self.gate_center = float(gate_center)
        self.eps = float(eps)
        self.early_exit = bool(early_exit)
        self.straight_through_zeroing = bool(straight_through_zeroing)
        self._templates: dict[tuple, torch.Tensor] = {}  # `_initial_rows` per input shape (not state)

    def extra_repr(self) -> str:
        return (
            f"gate_scale={self.gate_scale}, gate_center={self.gate_center}, eps={self.eps}, "
            f"early_exit={self.early_exit}, straight_through_zeroing={self.straight_through_zeroing}"
        )

    def halting_score(self, block_output: torch.Tensor) -> torch.Tensor:
        """h = sigmoid(gate_scale * y[..., 0] - gate_center) for y = `block_output` (..., C), in float32
        whatever the compute dtype."""
        return torch.sigmoid(block_output[..., 0].float() * self.gate_scale - self.gate_center)

    def halting_step(self, cumulative, remainder, h, running=None):
        """One block of the halting rule, elementwise, in the authors' order and strict comparisons:
        `cumulative` scores and `remainder` before this block, `h` its halting scores, `running` (None:
        all) 1.0 where the token still ran.

        Returns the new cumulative score and remainder, the weight of this block's output in the
        token's output (R where it halts now, h where it runs on, 0 for a token that sits exactly on
        1 - eps: the authors' code treats it as halted without adding its remainder), the ponder
        increment R * reached, and 1.0 where the token runs on.
        """
        cumulative = cumulative + h
        reached = (cumulative > 1 - self.eps).to(h.dtype)
        if running is not None:
            reached = reached * running
        runs_on = (cumulative < 1 - self.eps).to(h.dtype)
        weight = remainder * reached + h * runs_on
        ponder_step = remainder * reached
        return cumulative, remainder - runs_on * h, weight, ponder_step, runs_on

    def extra_flops(self, info: SparseInfo, num_patches: int) -> torch.Tensor:
        return no_extra_flops(info)  # halting reads channel 0 of each block's output: no matmul of its own

    def token_depth(self, info: SparseInfo) -> torch.Tensor:
        return info.extra["token_depth"]

    def progress(self, info: SparseInfo) -> dict[str, str]:
        """The mean token depth (blocks computed) of the last forward."""
        return {"depth": f"{float(info.extra['mean_depth'].float().mean()):.2f}"}

    # --- engine hooks ------------------------------------------------------------------------------

    def begin(self, model: VisionTransformer, state: TokenState) -> None:
        batch, tokens, channels = state.x.shape
        common = {
            "blocks": len(model.blocks),
            "grid": tuple(model.patch_embed.grid_size),
        }
        if state.regime == "mask":
            zeros = state.x.new_zeros(batch, tokens, dtype=torch.float32)
            state.policy_state = _MaskedRun(
                **common,
                halting_score_layer=[],
                running=zeros + 1,
                cumulative=zeros,
                remainder=zeros + 1,
                ponder=zeros,
                depth=zeros,
            )
            return
        total = batch * tokens
        accumulate = torch.promote_types(state.x.dtype, torch.float32)
        state.policy_state = _PackedRun(
            **common,
            tokens=state.x.reshape(total, channels),
            acc=state.x.new_zeros(total, channels, dtype=accumulate),
            rows=self._initial_rows(model, batch, tokens, state.num_prefix, state.x.device),
            layout=PackedLayout.single(tokens)
            if batch == 1
            else PackedLayout.full(batch, tokens, state.x.device),
            left=[],
            scores=[],
        )

    def _initial_rows(
        self, model: VisionTransformer, batch: int, tokens: int, prefix: int, device: torch.device
    ) -> torch.Tensor:
        """A fresh copy of the pack's rows before block 0 (one op: the template is kept per shape)."""
        head = (
            model.global_pool,
            getattr(model, "pool_include_prefix", False),
            getattr(model, "head_dist", None) is not None,
        )
        key = (batch, tokens, prefix, str(device), head)
        template = self._templates.get(key)
        if template is None:
            template = torch.ones(7, batch * tokens, device=device)
            template[CUMULATIVE] = 0.0
            template[PONDER_STEP] = 0.0
            template[IMAGE] = torch.arange(batch, device=device).repeat_interleave(tokens)
            template[POSITION] = torch.arange(tokens, device=device).repeat(batch)
            template[HEAD] = _head_tokens(model, tokens, prefix, device).repeat(batch)
            if len(self._templates) >= 8:  # a few batch sizes in use; never grow without bound
                self._templates.clear()
            self._templates[key] = template
        return template.clone()

    def before_block(self, index: int, state: TokenState) -> None:
        run = state.policy_state
        if isinstance(run, _PackedRun):
            state.active_tokens = run.tokens.shape[0] if state.batch_size == 1 else run.layout.counts

    def run_block(self, index: int, block: nn.Module, state: TokenState) -> None:
        run = state.policy_state
        if isinstance(run, _MaskedRun):
            state.x = halting_block(
                block, state.x, run.running, MASKED_KEY_BIAS, self.straight_through_zeroing
            )
        elif run.tokens.shape[0]:
            with torch.no_grad():  # the packed inference form is not differentiable (train mode is)
                run.tokens = packed_block(block, run.tokens, run.layout, run.rows[POSITION].long())

    def after_block(self, index: int, state: TokenState) -> None:
        run = state.policy_state
        if isinstance(run, _PackedRun):
            with torch.no_grad():
                self._pack_after_block(index, run, state.batch_size)
            return
        y = state.x
        h = self.halting_score(y)
        # Mean over all images and tokens, halted ones included. The authors' code takes
        # torch.mean(h[1:]), dropping image 0 of every batch from the prior: a slip, not reproduced
        # (tests/test_avit_grads.py holds the prior's gradient to theirs over all images).
        run.halting_score_layer.append(h.mean())
        if index == run.blocks - 1:
            h = torch.ones_like(h)
        run.ponder = run.ponder + run.running
        run.depth = run.depth + run.running
        run.cumulative, run.remainder, weight, ponder_step, runs_on = self.halting_step(
            run.cumulative, run.remainder, h, run.running
        )
        run.ponder = run.ponder + ponder_step
        run.output = run.output + y * weight.unsqueeze(-1)
        run.running = runs_on

    def halting_step_(
        self,
        cumulative: torch.Tensor,
        remainder: torch.Tensor,
        h: torch.Tensor,
        ponder_step: torch.Tensor,
        runs_on: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`halting_step` in place and in fewer ops (inference, no gradient), on a `cumulative` that
        already includes `h`: writes each token's ponder step (its remainder where it halts now, else
        0) into `ponder_step` and returns the weight of this block's output and a bool mask of the
        tokens that run on (`cumulative < 1 - eps`, computed unless given). `remainder` is updated where
        a token runs on (the others leave the pack; theirs is then meaningless). Same values as
        `halting_step` for every token."""
        if runs_on is None:
            runs_on = cumulative < 1 - self.eps
        # a token exactly at 1 - eps halts with weight 0 (the authors' strict comparisons)
        torch.mul(remainder, cumulative > 1 - self.eps, out=ponder_step)
        weight = torch.where(runs_on, h, ponder_step)
        remainder.sub_(h)
        return weight, runs_on

    def _pack_after_block(self, index: int, run: _PackedRun, batch: int) -> None:
        """The halting rule on the pack, in few tensor ops and one read-back (see `_PackedRun`)."""
        y = run.tokens
        tokens = y.shape[0]
        if not tokens:  # every image has left the pack: this block computed nothing
            run.scores.append(run.scores[-1][:0])
            return
        h = self.halting_score(y)
        run.scores.append(h)  # `end` averages them per block (over the tokens each block computed)
        cumulative, remainder, ponder_step = run.rows[CUMULATIVE], run.rows[REMAINDER], run.rows[PONDER_STEP]
        if index == run.blocks - 1:  # h = 1: every token halts with its remainder as weight and ponder step
            run.acc.addcmul_(y, remainder.unsqueeze(1))  # y * weight is computed in float32 (acc's dtype)
            ponder_step.copy_(remainder)
            run.left.append((run.acc, run.rows, index + 1))
            return
        cumulative.add_(h)
        runs_on = cumulative < 1 - self.eps
        running = run.rows[HEAD : ONE + 1] * runs_on  # (2, T): running head tokens, running tokens
        head_running, still = running.sum(1).tolist()
        if still == tokens:  # no token halts: each runs on with weight h
            remainder.sub_(h)
            run.acc.addcmul_(y, h.unsqueeze(1))
            return
        weight, runs_on = self.halting_step_(cumulative, remainder, h, ponder_step, runs_on)
        run.acc.addcmul_(y, weight.unsqueeze(1))
        self._repack(run, runs_on, running, head_running, int(still), index, batch)

    def _repack(
        self,
        run: _PackedRun,
        runs_on: torch.Tensor,
        running: torch.Tensor,
        any_head_running: float,
        still: int,
        index: int,
        batch: int,
    ) -> None:
        """Move the tokens that do not run on (`still` tokens do; with early_exit, every token of an
        image whose head tokens all halted leaves too) from the pack to `run.left`. `running` (2, T):
        the running head tokens and the running tokens, as 1.0."""
        keep, kept = runs_on, still
        if self.early_exit and batch == 1 and not any_head_running:  # the image leaves: all its tokens
            kept = 0
        elif self.early_exit and batch > 1:
            image = run.rows[IMAGE].long()
            live = torch.zeros(batch, device=keep.device).index_add_(0, image, running[0])
            keep = keep & (live[image] > 0)
            kept = int(keep.sum())
        if not kept:
            run.left.append((run.acc, run.rows, index + 1))
            run.tokens, run.acc, run.rows = run.tokens[:0], run.acc[:0], run.rows[:, :0]
        else:
            # kept tokens first, each part in pack order: one gather splits acc and rows in two
            order = torch.argsort(keep, descending=True, stable=True)
            acc, rows = run.acc.index_select(0, order), run.rows.index_select(1, order)
            run.left.append((acc[kept:], rows[:, kept:], index + 1))
            run.tokens = run.tokens.index_select(0, order[:kept])
            run.acc, run.rows = acc[:kept], rows[:, :kept]
        if batch == 1:
            run.layout = PackedLayout.single(kept)
        else:
            run.layout = PackedLayout.from_image_ids(run.rows[IMAGE].long(), batch)

    def end(self, state: TokenState) -> None:
        run = state.policy_state
        batch, tokens = state.batch_size, state.num_prefix + state.num_patches
        if isinstance(run, _MaskedRun):
            # The halting-weighted sums accumulate in float32; the final norm runs in the model's dtype.
            state.x, depth, ponder = run.output.to(state.x.dtype), run.depth.long(), run.ponder
            halting_score_layer = torch.stack(run.halting_score_layer)
        else:
            with torch.no_grad():
                depth, ponder, halting_score_layer = self._pack_end(run, state, batch, tokens)
        grid = run.grid
        patches = depth[:, state.num_prefix :]
        depth_map = patches.reshape(batch, *grid) if grid[0] * grid[1] == patches.shape[1] else None
        state.stats = HaltingStats(
            token_depth=depth,
            mean_depth=depth.float().mean(dim=1),
            ponder=ponder,
            halting_score_layer=halting_score_layer,
            depth_map=depth_map,
        )

    @staticmethod
    def _pack_end(
        run: _PackedRun, state: TokenState, batch: int, tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every token left the pack once: write its sum, depth and ponder cost to its place."""
        device = run.acc.device
        acc = torch.cat([a for a, _, _ in run.left])
        rows = torch.cat([r for _, r, _ in run.left], dim=1)
        depth = torch.tensor([d for a, _, d in run.left for _ in range(a.shape[0])], device=device)
        flat = rows[POSITION].long()
        if batch > 1:
            flat += rows[IMAGE].long() * tokens
        total = batch * tokens
        output = acc.new_zeros(total, acc.shape[1]).index_copy_(0, flat, acc)
        state.x = output.view(batch, tokens, -1).to(run.tokens.dtype)
        token_depth = torch.zeros(total, dtype=torch.long, device=device).index_copy_(0, flat, depth)
        ponder = torch.zeros(total, device=device).index_copy_(0, flat, rows[PONDER_STEP] + depth)
        scores = torch.cat(run.scores)
        lengths = torch.tensor([h.numel() for h in run.scores], device=device)
        halting_score_layer = torch.segment_reduce(
            scores, "mean", lengths=lengths
        )  # nan where a block ran none
        return token_depth.view(batch, tokens), ponder.view(batch, tokens), halting_score_layer


def avit_stats(model: nn.Module) -> HaltingStats:
    """Per-image halting statistics of the last forward of an A-ViT model (see `HaltingStats`).

    Mask regime (training): the authors' quantities; every token of every image. Gather regime
    (inference): token_depth counts the blocks that ran; with early_exit, tokens of an image whose
    class token halted stop there (their ponder is then the blocks they ran, without remainder), and
    halting_score_layer averages the tokens each block computed (nan for a block that ran none).
    `model` must be made by `avit` and have run a forward.
    """
    return policy_stats(model, AViTPolicy, HaltingStats, "avit_stats", "avit")


def _real(name: str, value) -> float:
    return check_number(name, value, math.isfinite, "a finite number")


def avit(
    model: VisionTransformer,
    gate_scale: float = 10.0,
    gate_center: float | None = None,
    eps: float = 0.01,
    early_exit: bool = True,
    straight_through_zeroing: bool = True,
    target_gflops: float | None = None,
    images: torch.Tensor | None = None,
) -> VisionTransformer:
    """Make `model` an A-ViT in place (and return it); its state dict stays exactly timm's.

    Halting score h = sigmoid(gate_scale * y[..., 0] - gate_center) of each block's output y; a token
    halts once its summed scores exceed 1 - eps. The authors use gate_scale 10, gate_center 30 for
    DeiT-T and 75 for DeiT-S; the defaults, gate_scale 10 and eps 0.01, are A-ViT's DeiT-T setting
    (Yin et al. 2022, the authors' code). early_exit (inference only, default True): stop computing an
    image once the tokens its head reads have halted (the logits are unchanged; its other tokens'
    depths then stop there too). Eval mode runs the packed inference form, which is not differentiable:
    its blocks compute without autograd even where gradients are on (train mode is the differentiable
    form).

    straight_through_zeroing (training only, default True): a halted token's block input is zeroed with
    an identity gradient, as the authors' training does it (`out.data = out.data * mask`, which autograd
    does not see); their released checkpoints were trained so. False zeroes it with an ordinary product,
    whose gradient is zero there. Forward values are identical; only the distributional prior's gradient
    differs (through halted tokens' halting scores, which the per-block mean includes).

    gate_center defaults to 30 (the authors' DeiT-T). `target_gflops` (GMACs per image: multiply-adds,
    what the papers call FLOPs; default None) instead of it, with `images` (a few of your own,
    (B, C, H, W)): the centre at which the model executes at most that many GMACs per image on average
    over `images`, within 2% (`tokensparse.budget`). A-ViT's FLOPs depend on the image,
    so other images execute more or fewer; calibrate on images like those it will see.
    """
    if not check_model(model).family.startswith("timm"):
        check_vit(model, "A-ViT", "its head and halting read timm's pooling (global_pool)")
    if target_gflops is not None and gate_center is not None:
        raise ValueError(
            f"give gate_center or target_gflops, not both (gate_center={gate_center!r}, target_gflops={target_gflops!r})"
        )
    if target_gflops is None and images is not None:
        raise ValueError("images calibrate the gate for target_gflops; give target_gflops too")
    gate_center = 30.0 if gate_center is None else gate_center
    if _real("gate_scale", gate_scale) <= 0:
        raise ValueError(f"gate_scale must be > 0, got {gate_scale!r}")
    _real("gate_center", gate_center)
    if not 0.0 < _real("eps", eps) < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps!r}")
    check_flag("early_exit", early_exit)
    check_flag("straight_through_zeroing", straight_through_zeroing)
    policy = AViTPolicy(gate_scale, gate_center, eps, early_exit, straight_through_zeroing)
    sparsify(model, policy, "halting")
    if target_gflops is not None:
        from ..budget import solve_gate_center

        model.halting.gate_center = solve_gate_center(model, target_gflops, images)
    return model


def from_config(model: VisionTransformer, cfg: TrainConfig) -> VisionTransformer:
    """`avit` on `model` with the settings of the `TrainConfig` `cfg` (the registry's constructor)."""
    return avit(
        model,
        gate_scale=cfg.gate_scale,
        gate_center=cfg.gate_center,
        eps=cfg.halt_eps,
        straight_through_zeroing=cfg.straight_through_zeroing,
    )


def _objective(cfg: TrainConfig, depth: int) -> nn.Module:
    from ..losses.avit import AViTLoss

    return AViTLoss.from_config(cfg, depth)


def _bench(model, gate_centers, settings, **options):
    """`tokensparse bench` for A-ViT: its own bench, on a batch of plain and busy images (halting
    depends on the image); DeiT-T by default, as the paper's speed model."""
    from ..bench import bench_avit

    gate_scale = settings.get("gate_scale") or 10.0
    return bench_avit(
        model or "deit_tiny_patch16_224", gate_centers=gate_centers, gate_scale=gate_scale, **options
    )


# The authors' recipe (NVlabs/A-ViT): no distillation, every parameter trained, the block input zeroed
# through `.data` (straight-through).
register_method(
    Method(
        "avit",
        sparsify=from_config,
        objective=_objective,
        recipe=dict(
            gate_scale=10.0,
            gate_center=30.0,
            halt_eps=0.01,
            ponder_weight=5e-4,
            prior_weight=1e-3,
            straight_through_zeroing=True,
            distill_weight=0.0,
        ),
        settings=(
            Setting(
                "gate_scale",
                float,
                "gate scale gamma (halting score sigmoid(gamma * y0 - beta))",
                low=0,
                low_in=False,
                source="A-ViT main_act.py, gate_scale",
            ),
            Setting(
                "gate_center",
                float,
                "gate centre beta (30 for DeiT-T, 75 for DeiT-S in the paper)",
                source="A-ViT main_act.py, gate_center",
            ),
            Setting(
                "halt_eps",
                float,
                "halting threshold epsilon (a token halts once its scores sum past 1 - eps)",
                low=0,
                high=1,
                low_in=False,
                high_in=False,
            ),
            Setting(
                "ponder_weight", float, "weight of the ponder loss", low=0, source="A-ViT ponder_token_scale"
            ),
            Setting(
                "prior_weight",
                float,
                "weight of the distributional prior (KL to a Gaussian over depths)",
                low=0,
                source="A-ViT distr_prior_alpha",
            ),
            Setting(
                "prior_depth",
                int,
                "the prior's centre depth (default: 2/3 of the depth, 8 of 12 as the paper)",
                low=1,
            ),
            Setting(
                "straight_through_zeroing",
                bool,
                "zero halted tokens' block input as the authors' out.data (no "
                "gradient through the product); --no-straight-through-zeroing for a plain product",
            ),
            DISTILL_WEIGHT,
        ),
        bench_setting="gate_center",
        bench=_bench,
        bench_bound="FLOP ratio dense/A-ViT",
    )
)
