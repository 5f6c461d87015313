"""`tokensparse export`."""

from __future__ import annotations

import argparse

from .args import _add_target_gflops, _methods, _non_negative_int, _positive_int, _ratio


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a dense or sparsified ViT to ONNX (fixed batch and image size), checked with onnxruntime",
        description="Export the inference form to ONNX (outputs: logits, and patch_index, the original patch "
        "of each final patch token, for a sparsified model) and check onnxruntime against PyTorch. A-ViT "
        "cannot be exported (data-dependent token counts).",
    )
    p.add_argument("output", help="the .onnx file to write")
    p.add_argument("--run", default=None, help="a training run folder (config.json + weights); else --model")
    p.add_argument("--model", default="deit_small_patch16_224", help="timm model name (default: %(default)s)")
    p.add_argument(
        "--method",
        default=None,
        choices=_methods(),
        help="token policy (default: the run's, else dynamicvit); with --run it must be the run's; A-ViT "
        "is refused (its token counts depend on the image)",
    )
    p.add_argument("--checkpoint", default=None, help="weights of the sparsified model (else random weights)")
    p.add_argument("--num-classes", type=_positive_int, default=None, help="classes of the head")
    p.add_argument(
        "--keep-ratio", type=_ratio, default=None, help="keep ratio (default: the run's, else 0.7)"
    )
    p.add_argument(
        "--tome-r",
        type=_non_negative_int,
        default=None,
        help="ToMe: tokens merged per block (default: the run's, else the recipe's 8)",
    )
    p.add_argument(
        "--seed", type=int, default=None, help="random pruning's seed (default: the run's, else 0)"
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=1, help="fixed batch size (default: %(default)s)"
    )
    p.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    _add_target_gflops(p)
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from ..bench import make_policy
    from ..checkpoints import load_checkpoint
    from ..export import export_onnx

    if args.run is not None:  # every setting given reaches the run's method, or is refused
        from ..runs import load_with_config

        model = load_with_config(
            args.run,
            method=args.method,
            keep_ratio=args.keep_ratio,
            tome_r=args.tome_r,
            seed=args.seed,
            target_gflops=args.target_gflops,
        )[0]
    else:
        import timm

        method = args.method or "dynamicvit"
        kwargs = {} if args.img_size is None else {"img_size": args.img_size}
        if args.num_classes is not None:
            kwargs["num_classes"] = args.num_classes
        model = timm.create_model(args.model, pretrained=False, **kwargs)
        if method != "dense":  # the method's recipe, with the settings given here
            given = dict(keep_ratio=args.keep_ratio, tome_r=args.tome_r, target_gflops=args.target_gflops)
            model = make_policy(method, seed=args.seed or 0, **given)(
                model
            )  # a setting it reads not: refused
        elif args.target_gflops is not None:
            raise ValueError("--target-gflops solves a token method's setting; the dense model has none")
        if args.checkpoint is not None:
            load_checkpoint(model, args.checkpoint)
    result = export_onnx(
        model.eval(),
        args.output,
        batch_size=args.batch_size,
        image_size=args.img_size,
        verify=not args.no_verify,
    )
    check = (
        "not verified"
        if result.max_abs_diff is None
        else f"onnxruntime vs PyTorch: max |logit diff| {result.max_abs_diff:.2g}"
        + ("" if result.same_patches is None else f", same kept patches: {result.same_patches}")
    )
    print(
        f"wrote {result.path} ({result.method}, batch {result.batch_size}, "
        f"{result.image_size[0]}x{result.image_size[1]}, outputs {', '.join(result.output_names)}); {check}"
    )
    return 0
