"""Reference numbers of the authors' dynamic ConvNeXt and Swin (DynamicViT repo, T-PAMI extension).

    python tests/golden_tools/make_dynconv_golden.py /path/to/DynamicViT [--out tests/golden/dynconv_official.safetensors]

Runs their `models/dyconvnext.py` (AdaConvNeXt, ConvNeXt_Teacher), `models/dyswin.py`
(AdaSwinTransformer, SwinTransformer_Teacher) and `losses.py` (ConvNextDistillDiffPruningLoss) from a
checkout given on the command line (never copied into this project) on tiny ConvNeXt-T- and
Swin-T-shaped models with seeded random weights, and stores only numbers: weights (their key names,
float16-exact values), inputs, eval logits and kept positions, seeded training-mode logits and
decisions, and their training loss. Old-timm/old-torch imports of their utils.py are shimmed here.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

KEEP_RATIO = 0.7
SPARSE_RATIO = [KEEP_RATIO, KEEP_RATIO - 0.2, KEEP_RATIO - 0.4]  # their main.py
TRAIN_SEED = 1234
CONVNEXT = dict(depths=[3, 3, 9, 3], dims=[8, 16, 32, 64], num_classes=10, img_size=96, batch=3)
SWIN = dict(
    img_size=64,
    patch_size=2,
    embed_dim=8,
    depths=[2, 2, 6, 2],
    num_heads=[1, 2, 2, 4],
    window_size=4,
    num_classes=10,
    batch=3,
)


def import_authors(code: Path):
    sys.modules.setdefault("torch._six", types.SimpleNamespace(inf=math.inf))  # gone from modern torch
    if importlib.util.find_spec("tensorboardX") is None:
        sys.modules.setdefault("tensorboardX", types.SimpleNamespace(SummaryWriter=object))
    sys.path.insert(0, str(code))
    return (
        importlib.import_module("models.dyconvnext"),
        importlib.import_module("models.dyswin"),
        importlib.import_module("losses"),
    )


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights that spread scores like trained ones; values exactly representable in float16."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            v = torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel())
        elif name.endswith("gamma"):
            v = 0.3 * torch.randn(p.shape, generator=g)
        elif name.endswith("weight"):  # norms
            v = 1 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            v = 0.1 * torch.randn(p.shape, generator=g)
        p.copy_(v.half().float())


def min_gap(scores: torch.Tensor, count: int) -> float:
    top = scores.sort(dim=1, descending=True).values
    return float((top[:, count - 1] - top[:, count]).min())


def run(prefix, model, teacher, loss_mod, images, labels, score_of, swin_token, out, meta):
    kept, scores = [], []

    def hook(module, args, output):
        kept.append(output[1][0].sort(dim=1).values)

    def score_hook(module, args, output):
        scores.append(output[..., 0] if swin_token else output[:, 0].flatten(1))

    handles = []
    for p in score_of(model):
        handles.append(p.register_forward_hook(hook))
        handles.append(p.out_conv.register_forward_hook(score_hook))
    model.eval()
    with torch.no_grad():
        logits = model(images)
    for h in handles:
        h.remove()
    out[f"{prefix}.images"] = images
    out[f"{prefix}.labels"] = labels
    out[f"{prefix}.eval_logits"] = logits
    for s, (index, score) in enumerate(zip(kept, scores, strict=True)):
        out[f"{prefix}.eval_kept.stage{s}"] = index
        meta[f"{prefix}.min_gap.stage{s}"] = min_gap(score, index.shape[1])
    model.train()
    torch.manual_seed(TRAIN_SEED)
    train_logits, featmap, decisions = model(images)
    out[f"{prefix}.train_logits"] = train_logits.detach()
    out[f"{prefix}.train_features"] = featmap.detach().reshape(images.shape[0], -1, featmap.shape[-1])
    for s, d in enumerate(decisions):
        out[f"{prefix}.train_decision.stage{s}"] = d.detach().reshape(images.shape[0], -1)
    teacher.load_state_dict(model.state_dict(), strict=False)
    teacher.eval()
    criterion = loss_mod.ConvNextDistillDiffPruningLoss(
        teacher,
        torch.nn.CrossEntropyLoss(),
        clf_weight=1.0,
        keep_ratio=SPARSE_RATIO,
        mse_token=True,
        ratio_weight=10.0,
        swin_token=swin_token,
    )
    loss, parts = criterion(images, (train_logits, featmap, decisions), labels)
    out[f"{prefix}.train_loss"] = loss.detach().reshape(1)
    out[f"{prefix}.train_loss_parts"] = torch.stack([p.detach() for p in parts])
    for k, v in model.state_dict().items():
        if v.is_floating_point() and not k.endswith(("attn_mask", "relative_position_index")):
            out[f"{prefix}.state.{k}"] = v.half()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("code", type=Path, help="a checkout of github.com/raoyongming/DynamicViT")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "golden" / "dynconv_official.safetensors",
    )
    args = parser.parse_args()
    dyconvnext, dyswin, losses = import_authors(args.code.resolve())
    torch.set_num_threads(1)
    out: dict[str, torch.Tensor] = {}
    meta: dict[str, float] = {}

    c = CONVNEXT
    torch.manual_seed(0)
    model = dyconvnext.AdaConvNeXt(
        num_classes=c["num_classes"],
        depths=c["depths"],
        dims=c["dims"],
        sparse_ratio=SPARSE_RATIO,
        pruning_loc=[1, 2, 3],
    )
    randomise(model, seed=1)
    teacher = dyconvnext.ConvNeXt_Teacher(num_classes=c["num_classes"], depths=c["depths"], dims=c["dims"])
    g = torch.Generator().manual_seed(2)
    images = torch.randn(c["batch"], 3, c["img_size"], c["img_size"], generator=g).half().float()
    labels = torch.randint(0, c["num_classes"], (c["batch"],), generator=g)
    run("convnext", model, teacher, losses, images, labels, lambda m: m.score_predictor, False, out, meta)

    s = SWIN
    torch.manual_seed(0)
    kwargs = {k: v for k, v in s.items() if k != "batch"}
    model = dyswin.AdaSwinTransformer(
        **kwargs, drop_path_rate=0.0, pruning_loc=[1, 2, 3], sparse_ratio=SPARSE_RATIO
    )
    randomise(model, seed=3)
    teacher = dyswin.SwinTransformer_Teacher(**kwargs, drop_path_rate=0.0)
    g = torch.Generator().manual_seed(4)
    images = torch.randn(s["batch"], 3, s["img_size"], s["img_size"], generator=g).half().float()
    labels = torch.randint(0, s["num_classes"], (s["batch"],), generator=g)
    run(
        "swin", model, teacher, losses, images, labels, lambda m: m.layers[2].score_predictor, True, out, meta
    )

    for k, v in out.items():
        out[k] = v.contiguous()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "convnext": json.dumps(CONVNEXT),
        "swin": json.dumps(SWIN),
        "keep_ratio": str(KEEP_RATIO),
        "train_seed": str(TRAIN_SEED),
        "min_gaps": json.dumps(meta),
    }
    save_file(out, str(args.out), metadata=metadata)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB); min score gaps at the cut: {meta}")


if __name__ == "__main__":
    main()
