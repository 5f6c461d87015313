"""Reference gradients of the authors' A-ViT training (NVlabs/A-ViT) for tests/test_avit_grads.py.

Runs THEIR model code (timm/models/act_vision_transformer.py of their repository, imported from the
path given; nothing of it is copied here) once on the CPU, on the golden A-ViT weights
(../shared/golden/avit_official.safetensors), in training mode, and saves a few parameters'
gradients of each loss term separately, unweighted:

  ce            F.cross_entropy(logits, labels) (their criterion without smoothing or mixup)
  ponder        torch.mean(model.rho_token), as engine_act.py (which then scales it by
                --ponder_token_scale, 5e-4 in tokensparse's default)
  prior         the distributional prior KL as engine_act.py computes it (stack, / sum, clamp to
                [0.01, 0.99], model.kl_loss(q.log(), model.distr_target), 'batchmean' over 12 blocks),
                but on the per-block halting score averaged over ALL images: each block's full
                (B, N) halting scores h_lst[1] are recorded by wrapping its `forward_act` (their code
                runs unchanged) and averaged with torch.mean
  prior_released the same on their own `model.halting_score_layer`, i.e. torch.mean(h_lst[1][1:]),
                which drops image 0 (a slip tokensparse does not reproduce; kept, for two of the
                parameters, to show that it matters on this batch)

for gate_scale 10 and gate_center 2 and 5 (tokens halt at every depth). Shims, all in this process:
torch.Tensor.cuda / nn.Module.cuda return self (their code moves new tensors to the GPU), an `args`
namespace (act_mode 4, gate_scale, gate_center, distr_prior_alpha), and, when scipy is missing, a
`scipy.stats.norm.pdf` in numpy (their `utils.get_distribution_target` imports it).

    git clone -q https://github.com/NVlabs/A-ViT /tmp/avit_ref
    python tests/golden_tools/make_avit_grad_golden.py /tmp/avit_ref

Run it without tokensparse or the installed timm imported: their repository ships its own `timm`.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ("blocks.0.attn.qkv.weight", "blocks.5.mlp.fc1.weight", "patch_embed.proj.weight", "cls_token")
RELEASED_PARAMS = ("blocks.0.attn.qkv.weight", "cls_token")  # enough to show the slip matters
CENTERS = (2, 5)
LABELS = (3, 7, 1, 9)


def _shim_scipy() -> None:
    if importlib.util.find_spec("scipy") is not None:
        return

    class _Norm:
        @staticmethod
        def pdf(x, loc=0.0, scale=1.0):
            z = (np.asarray(x, dtype=np.float64) - loc) / scale
            return np.exp(-0.5 * z * z) / (scale * math.sqrt(2 * math.pi))

    stats = types.ModuleType("scipy.stats")
    stats.norm = _Norm()
    scipy = types.ModuleType("scipy")
    scipy.stats = stats
    sys.modules.update({"scipy": scipy, "scipy.stats": stats})


def _their_model(repo: Path, gate_center: float, state: dict[str, torch.Tensor]) -> nn.Module:
    sys.path.insert(0, str(repo))
    from timm.models.act_vision_transformer import VisionTransformer  # their vendored timm

    if "act_vision_transformer" not in sys.modules["timm.models.act_vision_transformer"].__file__:
        raise RuntimeError("imported the wrong timm")
    if not str(sys.modules["timm"].__file__).startswith(str(repo)):
        raise RuntimeError(
            f"timm came from {sys.modules['timm'].__file__}, not {repo}: run in a fresh process"
        )
    args = types.SimpleNamespace(
        act_mode=4, gate_scale=10.0, gate_center=float(gate_center), distr_prior_alpha=1e-3
    )
    model = VisionTransformer(
        img_size=112,
        patch_size=8,
        embed_dim=48,
        depth=12,
        num_heads=3,
        mlp_ratio=4,
        qkv_bias=True,
        num_classes=10,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        args=args,
    )
    model.load_state_dict(state, strict=True)
    model.train()
    model.recorded_h = []
    for block in model.blocks:

        def recording(x, mask=None, _forward=block.forward_act):
            out, h_lst = _forward(x, mask)
            model.recorded_h.append(h_lst[1])
            return out, h_lst

        block.forward_act = recording
    return model


def _prior_kl(model: nn.Module, per_block: list[torch.Tensor]) -> torch.Tensor:
    """engine_act.py's distributional prior term, unweighted, on the given per-block mean scores."""
    q = torch.stack(per_block)
    q = q / torch.sum(q)
    q = torch.clamp(q, 0.01, 0.99)
    return model.kl_loss(q.log(), model.distr_target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("repo", type=Path, help="an exported copy of NVlabs/A-ViT")
    parser.add_argument(
        "--golden", type=Path, default=ROOT.parent / "shared" / "golden" / "avit_official.safetensors"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "golden" / "avit_grads.safetensors")
    opts = parser.parse_args()
    if not (opts.repo / "timm" / "models" / "act_vision_transformer.py").is_file():
        parser.error(f"{opts.repo} is not a copy of NVlabs/A-ViT (no timm/models/act_vision_transformer.py)")

    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    _shim_scipy()
    torch.set_num_threads(1)

    golden = load_file(str(opts.golden))
    state = {k[len("model.") :]: v for k, v in golden.items() if k.startswith("model.")}
    images = golden["input"]
    labels = torch.tensor(LABELS)
    out: dict[str, torch.Tensor] = {"labels": labels}
    for center in CENTERS:
        model = _their_model(opts.repo, center, state)
        out["prior_target"] = model.distr_target.float().clone()
        terms = {
            "ce": lambda logits, m: F.cross_entropy(logits, labels),
            "ponder": lambda logits, m: torch.mean(m.rho_token),
            "prior": lambda logits, m: _prior_kl(m, [h.mean() for h in m.recorded_h]),
            "prior_released": lambda logits, m: _prior_kl(m, m.halting_score_layer),
        }
        for term, loss_fn in terms.items():
            model.zero_grad(set_to_none=True)
            model.recorded_h = []
            logits = model(images)
            loss = loss_fn(logits, model)
            loss.backward()
            out[f"loss.{term}.gate_center{center}"] = loss.detach().reshape(1).float()
            for name in PARAMS if term != "prior_released" else RELEASED_PARAMS:
                out[f"grad.{term}.gate_center{center}.{name}"] = (
                    model.get_parameter(name).grad.detach().clone()
                )
        out[f"logits.gate_center{center}"] = logits.detach().clone()
        out[f"counter_token.gate_center{center}"] = model.counter_token.detach().clone()
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(opts.out))
    print(f"wrote {opts.out} ({len(out)} tensors)")
    for key, value in out.items():
        if key.startswith("loss."):
            print(f"  {key} = {value.item():.6g}")


if __name__ == "__main__":
    main()
