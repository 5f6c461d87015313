"""Export a (sparsified) timm ViT to ONNX for onnxruntime, with the kept patches as a second output.

The exported graph is the inference form (gather regime): DynamicViT, EViT, random, static pruning
and ToMe keep a number of tokens per block that depends only on the model's settings, never on the
image, so the whole forward is one static graph (top-k and gathers are ordinary ONNX ops). A-ViT is
the exception: its halted tokens leave the computation, so each block's token count depends on the
image's values (data-dependent shapes), which a static graph cannot hold.

The exporter is torch.export's (`torch.onnx.export(..., dynamo=True)`): with torch 2.14 it exports
every method above, while the legacy TorchScript exporter fails on the top-k/gather bookkeeping of
DynamicViT and the pruning baselines and on ToMe's merge (and is deprecated).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoints import atomic_path
from .checks import check_int
from .engine import _INFO_ATTR, check_images, get_policy
from .flops import input_size

OUTPUT_NAMES = ("logits", "patch_index")


@dataclass
class ExportResult:
    """What `export_onnx` wrote and how onnxruntime's run of it compared with eager PyTorch.

    path:          the .onnx file.
    method:        the exported model's method ('dense', 'dynamicvit', ...; `check_exportable`).
    batch_size:    the fixed batch size of the graph.
    image_size:    the fixed (H, W) of its input images.
    output_names:  ('logits', 'patch_index') for a sparsified model, ('logits',) for a dense one.
    max_abs_diff:  largest |logit difference| between onnxruntime and eager PyTorch (None unverified).
    same_patches:  whether onnxruntime kept exactly the patches eager PyTorch kept (None unverified).
    """

    path: Path
    method: str
    batch_size: int
    image_size: tuple[int, int]
    output_names: tuple[str, ...]
    max_abs_diff: float | None = None
    same_patches: bool | None = None


class _WithPatchIndex(nn.Module):
    """The model's forward returning (logits, patch_index): for each final patch token, its original patch."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images)
        return logits, self.model.__dict__[_INFO_ATTR].patch_index


def check_exportable(model: nn.Module) -> str:
    """The method name of `model` ('dense' for a plain timm model); ValueError if it cannot be exported."""
    from .policies.dynspatial import is_spatial_model, sparse_stage

    if is_spatial_model(model):  # ConvNeXt / Swin: the dynamic stage's counts are fixed by its settings
        try:
            sparse_stage(model)
        except ValueError:
            return "dense"
        return "dynamicspatial"
    policy = get_policy(model)
    if policy is None:
        return "dense"
    reason = policy.export_refusal()
    if reason is not None:
        raise ValueError(reason)
    return policy.method


@contextlib.contextmanager
def _export_mode(model: nn.Module, batch_size: int, image_size: tuple[int, int]):
    """Eval mode and, for seeded random pruning, its draws fixed as constants of the graph."""
    was_training = model.training
    model.eval()
    policy = get_policy(model)
    fixed = getattr(policy, "fix_draws", None)
    try:
        if fixed is not None:
            patch = model.patch_embed.patch_size
            patches = (image_size[0] // patch[0]) * (image_size[1] // patch[1])
            fixed(batch_size, patches, next(model.parameters()).device)
        yield
    finally:
        if fixed is not None:
            fixed(None)
        model.train(was_training)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    batch_size: int = 1,
    image_size: int | tuple[int, int] | None = None,
    verify: bool = True,
    atol: float = 1e-4,
    opset: int | None = None,
) -> ExportResult:
    """Export `model`'s inference form to an ONNX file at `path`, for a fixed batch size and image size.

    `model` is a timm VisionTransformer, dense or sparsified by tokensparse (dynamicvit, evit,
    random_prune with a seed, static_prune, tome). The graph takes `images` (batch_size, C, H, W) float32
    and returns `logits` and, for a sparsified model, `patch_index` (batch_size, M) int64: the original
    patch (row-major, 0..N-1) of each patch token that reached the final norm (for ToMe, the patch each
    merged token is anchored at). image_size defaults to the model's. With verify (needs onnxruntime),
    onnxruntime runs the file on random images and must give logits within `atol` of eager PyTorch and
    the same patch_index, else RuntimeError. ValueError for A-ViT (data-dependent shapes, see
    `check_exportable`) and for unseeded random pruning. batch_size defaults to 1, verify to True, atol
    to 1e-4; opset is the ONNX opset version (None: torch.onnx.export's default).
    """
    method = check_exportable(model)
    check_int("batch_size", batch_size, lambda v: v >= 1, "an int >= 1")
    if image_size is None:
        image_size = input_size(model)[1:]
    elif isinstance(image_size, int):
        image_size = (image_size, image_size)
    image_size = tuple(int(s) for s in image_size)
    patch = tuple(getattr(getattr(model, "patch_embed", None), "patch_size", (1, 1)))
    if any(s % p for s, p in zip(image_size, patch)):
        raise ValueError(
            f"image size {image_size[0]}x{image_size[1]} is not a multiple of the patch size "
            f"{patch[0]}x{patch[1]}: the patch embedding would drop the remainder"
        )
    path = Path(path)
    # written beside `path` and renamed when verified: a failed export leaves the old file whole
    with atomic_path(path, suffix=".tmp.onnx") as temporary:
        result = _export(model, method, temporary, batch_size, image_size, verify, atol, opset)
    result.path = path
    return result


def _export(
    model: nn.Module,
    method: str,
    path: Path,
    batch_size: int,
    image_size: tuple[int, int],
    verify: bool,
    atol: float,
    opset: int | None,
) -> ExportResult:
    param = next(model.parameters())
    channels = input_size(model)[0]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, channels, *image_size, generator=generator).to(param.device, param.dtype)
    logits_only = get_policy(model) is None  # dense, or a spatial model: no patch tokens to index
    if hasattr(model, "blocks"):  # a ViT: say what is wrong with the input before torch does
        check_images(model, images)
    module = model if logits_only else _WithPatchIndex(model)
    output_names = OUTPUT_NAMES[:1] if logits_only else OUTPUT_NAMES
    with _export_mode(model, batch_size, image_size), torch.no_grad():
        with warnings.catch_warnings(), open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            warnings.simplefilter("ignore")  # the exporter's progress lines and deprecation notes
            program = torch.onnx.export(
                module,
                (images,),
                dynamo=True,
                input_names=["images"],
                output_names=list(output_names),
                opset_version=opset,
                verbose=False,
            )
        program.save(str(path))
        _write_data_config(path, model, image_size)
        result = ExportResult(path, method, batch_size, image_size, output_names)
        if verify:
            expected = module(images)
            expected = expected if isinstance(expected, tuple) else (expected,)
            got = run_onnx(path, images)
            result.max_abs_diff = float((torch.from_numpy(got[0]) - expected[0].float().cpu()).abs().max())
            if not logits_only:
                result.same_patches = bool(torch.equal(torch.from_numpy(got[1]), expected[1].cpu()))
            if result.max_abs_diff > atol or result.same_patches is False:
                raise RuntimeError(
                    f"onnxruntime disagrees with PyTorch on {path}: max |logit difference| "
                    f"{result.max_abs_diff:.3g} (tolerance {atol}), same kept patches: {result.same_patches}"
                )
    return result


def _write_data_config(path: Path, model: nn.Module, image_size: tuple[int, int]) -> None:
    """The preprocessing the model expects, as ONNX metadata (`data_config`: timm's
    `resolve_model_data_config` with the exported size), so a deployment needs no other file."""
    import json

    import onnx
    from timm.data import resolve_model_data_config

    config = dict(resolve_model_data_config(model))
    config["input_size"] = (config["input_size"][0], *image_size)
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "data_config", json.dumps(config)
    onnx.save(proto, str(path))


def data_config(path: str | os.PathLike) -> dict:
    """The preprocessing the exported file at `path` records (input_size, mean, std, crop_pct,
    interpolation)."""
    import json

    import onnx

    for entry in onnx.load(str(path), load_external_data=False).metadata_props:
        if entry.key == "data_config":
            return json.loads(entry.value)
    raise ValueError(f"{path} records no data_config (exported by another tool or an older tokensparse)")


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU InferenceSession of `path` (intra-op threads = torch's unless given)."""
    try:
        import onnxruntime as ort
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ImportError(
            "running an exported model needs onnxruntime: pip install 'tokensparse[export]'"
        ) from err
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path_or_session, images: torch.Tensor) -> list:
    """Run an exported model (`path_or_session`: the .onnx path or an `onnx_session`) on `images` with
    onnxruntime; returns its outputs as numpy arrays."""
    session = path_or_session if hasattr(path_or_session, "run") else onnx_session(path_or_session)
    return session.run(None, {session.get_inputs()[0].name: images.detach().float().cpu().numpy()})
