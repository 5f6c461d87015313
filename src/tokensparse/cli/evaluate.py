"""`tokensparse eval` and `tokensparse predict`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .args import (
    _add_device,
    _add_target_gflops,
    _add_weights,
    _positional_run,
    _positive_int,
    _ratio,
    resolve_device,
)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="top-1/top-5, executed GFLOPs (MACs), img/s and keep ratio or depth of a trained model",
        description="Evaluate a trained run (or a weights file with --model and --method) on its data set's "
        "validation split. gflops counts executed multiply-adds (MACs) per image.",
    )
    _add_weights(p, positional=True)
    p.add_argument("--dataset", default=None, help="override the run's data set")
    p.add_argument("--data-root", default=None, help="override the run's data folder")
    p.add_argument(
        "--val-limit",
        type=_positive_int,
        default=None,
        help="evaluate N validation images (default: the run's)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=None, help="default: the run's")
    p.add_argument(
        "--keep-ratio", type=_ratio, default=None, help="evaluate DynamicViT at another keep ratio"
    )
    p.add_argument("--gate-center", type=float, default=None, help="evaluate A-ViT with another gate centre")
    _add_target_gflops(p)
    _add_device(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    args.run = _positional_run(args)
    from ..data import build_dataset, build_loader
    from ..evaluate import evaluate
    from ..flops import input_size
    from ..runs import load_with_config

    device = resolve_device(args.device)
    model, cfg = load_with_config(
        args.run,
        model=args.model,
        method=args.method,
        img_size=args.img_size,
        model_kwargs=args.model_kwargs,
        keep_ratio=args.keep_ratio,
        gate_center=args.gate_center,
        target_gflops=args.target_gflops,
    )
    dataset = build_dataset(
        args.dataset or cfg.dataset,
        args.data_root or cfg.data_root,
        "val",
        # a ViT / Swin runs at its built size; a ConvNeXt at the run's (None: the data's own)
        input_size(model)[1],
        limit=args.val_limit or cfg.val_limit,
    )
    from ..data import num_classes

    data_classes, head = num_classes(dataset), getattr(model, "num_classes", None)
    if head is not None and data_classes != head:
        raise ValueError(
            f"{args.run} classifies {head} classes but {args.dataset or cfg.dataset} "
            f"{args.data_root or cfg.data_root or ''} has {data_classes}: its top-1 would mean nothing; "
            "fine-tune the run on this data first (tokensparse train --checkpoint ...)"
        )
    loader = build_loader(dataset, args.batch_size or cfg.batch_size, is_training=False)
    result = evaluate(model.to(device), loader, device=device, progress=not args.json)
    result = {"run": args.run, "method": cfg.method, "model": cfg.model, **result}
    if args.json:
        from ..training import json_safe

        print(json.dumps(json_safe(result)))
    else:
        for key, value in result.items():
            print(f"{key:>22}: {value:.4g}" if isinstance(value, float) else f"{key:>22}: {value}")
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="classify image files with a trained run; --viz draws which tokens it kept",
        description="Read images with PIL, size and normalise them as the run's data set does, print the top "
        "classes of each; with --viz, a picture of the kept patches per stage (DynamicViT, EViT, random, "
        "static), the halting depth (A-ViT) or the merged groups (ToMe).",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    _add_weights(p, positional=False)
    p.add_argument(
        "--top", type=_positive_int, default=3, help="classes shown per image (default: %(default)s)"
    )
    p.add_argument("--viz", default=None, metavar="PNG", help="draw what the model kept into this PNG")
    _add_device(p)
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    p.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    import torch

    from ..runs import load_with_config, read_images, run_class_names

    device = resolve_device(args.device)
    model, cfg = load_with_config(
        args.run, model=args.model, method=args.method, img_size=args.img_size, model_kwargs=args.model_kwargs
    )
    model = model.to(device).eval()
    names = run_class_names(args.run, cfg)
    images = read_images(args.images, model, cfg.dataset)
    with torch.no_grad():
        probs = model(images.to(device)).float().softmax(-1).cpu()
    top = probs.topk(min(args.top, probs.shape[1]), dim=1)
    results = []
    for path, p, idx in zip(args.images, top.values.tolist(), top.indices.tolist()):
        classes = [names[i] if names is not None and i < len(names) else str(i) for i in idx]
        results.append(
            {
                "image": path,
                "top": [{"class": c, "index": i, "p": round(q, 4)} for c, i, q in zip(classes, idx, p)],
            }
        )
    if args.viz:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        from ..viz import token_maps

        titles = [f"{Path(r['image']).name}: {r['top'][0]['class']}" for r in results]
        args.viz = str(
            token_maps(
                model, images.to(device), args.viz, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, titles=titles
            )
        )
    if args.json:
        print(json.dumps(results if not args.viz else {"predictions": results, "viz": args.viz}))
    else:
        for r in results:
            shown = ", ".join(f"{t['class']} {100 * t['p']:.1f}%" for t in r["top"])
            print(f"{r['image']}: {shown}")
        if args.viz:
            print(f"wrote {args.viz}")
    return 0
