"""DiffRate's published per-block counts (OpenGVLab/DiffRate `compression_rate.json`), by timm name.

DeiT-T/S/B: timm's `deit_{tiny,small,base}_patch16_224` with their own weights (class-token head).
MAE ViT-B/L/H: the authors' `vit_{base,large}_patch16_mae` / `vit_huge_patch14_mae` (their
`models_mae.py`) are MAE's fine-tuned ImageNet classifiers, whose head averages the patch tokens (class
token left out; no final norm, `fc_norm` after the pool). In timm that is `vit_base_patch16_224`,
`vit_large_patch16_224`, `vit_huge_patch14_224` created with `global_pool="avg"` (which brings
`fc_norm` and drops the final norm; ViT-H/14 at 224: 16 x 16 patches, 257 tokens), with MAE's
fine-tuned weights loaded strictly from the checkpoint's "model" entry (`MAE_FINETUNED`). timm's
`.mae` tags are the self-supervised encoders without a classifier, not these. DiffRate pools such a
head by token size (`DiffRatePolicy.pool_weights`), as their `DiffRate/patch/mae.py` does."""

from __future__ import annotations

import math

# The authors' searched counts (OpenGVLab/DiffRate compression_rate.json at commit 91ae3e3; ImageNet;
# "ViT-{T,S,B}-DeiT" on DeiT weights, "ViT-{B,L,H}-MAE" on MAE's fine-tuned weights with the avg-pool
# head, see the module docstring), by timm model and their budget in GFLOPs (their formula,
# `authors_flops`): (prune_kept, merge_kept). Some MAE blocks list merge_kept > prune_kept or a count
# above the tokens present: such a block merges (or prunes) nothing, as in their code.
PUBLISHED: dict[str, dict[float, tuple[tuple[int, ...], tuple[int, ...]]]] = {
    "deit_tiny_patch16_224": {
        0.6: ((197, 196, 180, 157, 130, 107, 86, 73, 63, 51, 40, 3), (197, 187, 167, 139, 114, 90, 76, 66, 57, 45, 37, 3)),
        0.7: ((197, 196, 194, 180, 150, 123, 98, 82, 68, 60, 52, 3), (197, 196, 192, 158, 133, 103, 88, 72, 64, 58, 49, 3)),
        0.8: ((197, 197, 196, 186, 166, 147, 117, 103, 92, 80, 74, 3), (197, 196, 190, 172, 154, 125, 107, 96, 84, 78, 70, 3)),
        0.9: ((197, 197, 196, 190, 182, 166, 141, 125, 113, 105, 99, 3), (197, 196, 194, 188, 172, 147, 129, 115, 107, 103, 96, 3)),
        1.0: ((197, 197, 196, 194, 188, 184, 178, 164, 156, 137, 129, 21), (197, 197, 196, 190, 186, 154, 148, 156, 145, 135, 125, 21)),
    },
    "deit_small_patch16_224": {
        2.3: ((197, 192, 168, 143, 121, 105, 92, 74, 62, 45, 33, 3), (197, 180, 156, 127, 109, 98, 80, 66, 52, 37, 31, 3)),
        2.5: ((197, 192, 174, 156, 131, 115, 111, 99, 76, 50, 39, 3), (197, 186, 160, 133, 119, 107, 96, 82, 66, 43, 37, 3)),
        2.7: ((197, 196, 182, 160, 141, 127, 115, 105, 88, 66, 49, 3), (197, 188, 170, 147, 131, 119, 109, 96, 76, 54, 45, 3)),
        2.9: ((197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3), (197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3)),
        3.1: ((197, 197, 194, 180, 160, 147, 137, 129, 115, 92, 76, 3), (197, 196, 186, 164, 150, 141, 133, 121, 103, 78, 68, 3)),
    },
    "deit_base_patch16_224": {
        8.7: ((197, 192, 172, 156, 131, 107, 90, 72, 56, 33, 17, 3), (197, 178, 162, 141, 115, 96, 78, 60, 47, 21, 13, 3)),
        10.0: ((197, 194, 182, 168, 148, 129, 113, 101, 82, 49, 25, 3), (197, 186, 174, 156, 137, 117, 105, 90, 66, 31, 19, 3)),
        10.4: ((197, 196, 188, 174, 156, 141, 121, 103, 90, 58, 25, 3), (197, 190, 184, 164, 145, 131, 107, 94, 74, 31, 21, 3)),
        11.5: ((197, 197, 197, 188, 170, 154, 139, 123, 107, 72, 43, 3), (197, 197, 192, 178, 158, 145, 127, 111, 94, 50, 35, 3)),
        12.5: ((197, 197, 196, 192, 184, 170, 154, 139, 129, 94, 58, 3), (197, 196, 194, 190, 176, 160, 145, 131, 115, 68, 47, 3)),
    },
    "vit_base_patch16_224": {  # "ViT-B-MAE" (global_pool="avg", MAE fine-tuned weights)
        8.7: ((197, 192, 166, 143, 119, 103, 86, 72, 54, 43, 37, 23), (197, 176, 150, 127, 107, 92, 76, 58, 47, 41, 23, 23)),
        10.0: ((197, 194, 173, 154, 135, 120, 108, 92, 76, 64, 52, 40), (197, 181, 160, 141, 122, 116, 95, 80, 67, 60, 40, 40)),
        10.4: ((197, 195, 179, 159, 140, 122, 105, 100, 89, 71, 56, 45), (197, 187, 166, 145, 125, 109, 102, 97, 75, 64, 45, 45)),
        11.5: ((197, 196, 182, 172, 162, 147, 131, 109, 101, 94, 70, 49), (197, 192, 178, 164, 150, 133, 115, 101, 96, 82, 49, 49)),
    },
    "vit_large_patch16_224": {  # "ViT-L-MAE" (global_pool="avg", MAE fine-tuned weights)
        31.0: ((197, 195, 188, 179, 168, 157, 146, 143, 131, 121, 111, 102, 93, 85, 76, 70, 61, 53, 47, 35, 31, 26, 21, 14),
               (197, 191, 184, 172, 161, 151, 145, 135, 125, 117, 106, 96, 89, 80, 72, 64, 54, 50, 40, 27, 27, 23, 14, 14)),
        34.7: ((197, 195, 192, 189, 181, 170, 161, 160, 149, 140, 128, 118, 109, 95, 91, 82, 73, 68, 58, 54, 43, 38, 29, 18),
               (197, 193, 190, 185, 173, 164, 159, 154, 142, 137, 121, 111, 103, 97, 82, 76, 67, 61, 58, 48, 35, 32, 18, 18)),
        38.5: ((197, 197, 195, 190, 187, 183, 179, 171, 164, 159, 151, 143, 137, 114, 106, 89, 88, 85, 76, 57, 47, 53, 32, 24),
               (197, 196, 193, 189, 183, 180, 175, 167, 161, 158, 152, 134, 120, 110, 97, 91, 87, 83, 65, 47, 54, 34, 24, 24)),
        42.3: ((197, 197, 197, 195, 194, 193, 191, 187, 182, 180, 173, 149, 142, 134, 125, 121, 111, 106, 91, 87, 77, 39, 38, 32),
               (197, 197, 196, 194, 193, 192, 187, 183, 181, 173, 154, 146, 137, 127, 123, 114, 105, 98, 87, 75, 43, 45, 32, 32)),
        46.1: ((197, 197, 197, 196, 194, 192, 191, 188, 185, 181, 170, 157, 154, 146, 143, 139, 128, 125, 111, 100, 92, 83, 69, 60),
               (197, 197, 196, 195, 193, 191, 189, 187, 183, 176, 162, 155, 148, 145, 139, 133, 127, 118, 104, 95, 86, 71, 60, 60)),
    },
    "vit_huge_patch14_224": {  # "ViT-H-MAE" (global_pool="avg", MAE fine-tuned weights; 257 tokens)
        83.7: ((257, 255, 246, 227, 200, 178, 168, 159, 155, 145, 140, 139, 128, 119, 114, 109, 107, 100, 101, 102, 117, 104, 103, 97, 97, 102, 95, 90, 82, 83, 74, 56),
               (257, 252, 240, 212, 186, 172, 160, 163, 148, 142, 138, 132, 118, 114, 111, 108, 103, 102, 105, 106, 109, 105, 108, 99, 96, 96, 95, 86, 79, 77, 56, 56)),
        93.2: ((257, 257, 257, 257, 248, 250, 240, 239, 229, 209, 160, 159, 149, 111, 109, 106, 104, 106, 101, 104, 85, 96, 88, 93, 94, 88, 88, 91, 81, 78, 76, 75),
               (257, 257, 257, 249, 242, 241, 239, 229, 209, 203, 159, 150, 124, 107, 107, 101, 100, 101, 104, 89, 101, 88, 89, 88, 91, 86, 86, 83, 78, 78, 75, 75)),
        103.4: ((257, 256, 255, 251, 245, 235, 204, 197, 194, 189, 185, 177, 169, 160, 152, 144, 146, 139, 139, 136, 135, 133, 131, 128, 126, 126, 124, 121, 114, 96, 82, 53),
                (257, 256, 253, 247, 238, 211, 201, 195, 193, 185, 179, 171, 162, 154, 150, 145, 141, 138, 137, 135, 134, 133, 130, 127, 125, 125, 122, 114, 101, 90, 53, 53)),
        124.5: ((257, 256, 252, 248, 238, 237, 220, 214, 198, 186, 189, 191, 191, 185, 188, 186, 186, 183, 183, 182, 182, 183, 183, 181, 186, 182, 182, 180, 178, 180, 161, 136),
                (257, 254, 251, 244, 238, 223, 221, 203, 194, 192, 191, 190, 188, 184, 188, 185, 184, 183, 185, 183, 183, 185, 183, 183, 185, 183, 179, 167, 177, 133, 136, 136)),
    },
}  # fmt: skip

# The timm models of the MAE counts: their fine-tuned weights (MAE's FINETUNE.md, the URLs of the
# authors' models_mae.py), which load into timm.create_model(name, global_pool="avg") with
# load_state_dict(torch.load(file)["model"]); the counts assume that avg-pool head.
MAE_FINETUNED: dict[str, str] = {
    "vit_base_patch16_224": "https://dl.fbaipublicfiles.com/mae/finetune/mae_finetuned_vit_base.pth",
    "vit_large_patch16_224": "https://dl.fbaipublicfiles.com/mae/finetune/mae_finetuned_vit_large.pth",
    "vit_huge_patch14_224": "https://dl.fbaipublicfiles.com/mae/finetune/mae_finetuned_vit_huge.pth",
}


def published_counts(model_name: str, gflops: float) -> tuple[list[int], list[int]]:
    """The authors' searched (prune_kept, merge_kept) for `model_name` (a timm name: a DeiT, or a ViT-B/L/H
    for MAE's fine-tuned classifier, `MAE_FINETUNED`) at `gflops`, one of their budgets (GFLOPs by their
    formula: GMACs, multiply-adds): `PUBLISHED` (Chen et al. 2023); ValueError naming what there is."""
    entries = PUBLISHED.get(model_name)
    if entries is None:
        raise ValueError(f"no published DiffRate counts for {model_name}; they exist for {sorted(PUBLISHED)}")
    for budget, (prune, merge) in entries.items():
        if math.isclose(budget, gflops, abs_tol=1e-9):
            return list(prune), list(merge)
    raise ValueError(f"the authors published {model_name} at {sorted(entries)} GFLOPs, not {gflops:g}")
