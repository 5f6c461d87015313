"""Load and save weights without ever running code from a file.

Reads the authors' releases (.pth with the state dict under "model"; their dynamic ConvNeXt / Swin
layouts are renamed to timm's keys), timm checkpoints (a plain state
dict, or under "state_dict") and the project's own safetensors files. Pickled files are opened with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .policies.dynspatial import from_authors_layout

_STATE_KEYS = ("model", "state_dict", "model_state_dict")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint file at `path`, whatever of the supported layouts it uses."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types (UnpicklingError, RuntimeError, EOFError)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights only load failed" in first_line.lower():  # torch's advice here would be to run the code
            first_line = (
                "it holds Python objects besides tensors; re-save its weights alone, e.g. "
                "torch.save(model.state_dict(), path) or safetensors"
            )
        raise CheckpointError(
            f"{path} could not be loaded as weights (corrupt, truncated, or it contains code, which "
            f"tokensparse never runs): {first_line}"
        ) from err
    if isinstance(obj, dict):
        for key in _STATE_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path} holds no state dict of tensors (looked at the top level and {_STATE_KEYS})"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load weights from `path` into `model` (dense or sparsified); return the model.

    With strict=True (default) any missing or unexpected key, or a shape mismatch, raises a
    CheckpointError that lists them; with strict=False missing and unexpected keys are allowed
    (e.g. a dense timm checkpoint into a DynamicViT, whose predictors then keep their weights).
    """
    state = from_authors_layout(model, read_state_dict(path))
    own = model.state_dict()
    wrong_shape = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if wrong_shape:
        raise CheckpointError(
            f"{path} does not fit the model, shape mismatch in " + "; ".join(wrong_shape[:8])
        )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        lines = [f"{path} does not match the model:"]
        if missing:
            lines.append(f"  missing {len(missing)} keys: {_summarise(missing)}")
            if all(k.startswith("score_predictor.") for k in missing):
                lines.append(
                    "  (the file has no DynamicViT predictors: it is a dense model; train the predictors "
                    "from it with `tokensparse train --method dynamicvit --checkpoint FILE`, or in Python load "
                    "the backbone alone with load_checkpoint(model, FILE, strict=False))"
                )
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} keys: {_summarise(unexpected)}")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=False)
    return model


def _summarise(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def save_checkpoint(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write `model`'s weights to `path` as safetensors atomically (temp file in the same folder, then
    rename) and return the path; `metadata` (None: none) goes into the file's header, non-strings as
    JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    atomic_write_bytes(safetensors_bytes(tensors, metadata=meta), path)
    return path


def _write_file(f, data: bytes) -> None:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it over `path`.

    A reader sees the old file or the new one, never a part; a failed write (disk full, read-only
    folder) raises an OSError naming the file and leaves no temporary file behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                _write_file(f, data)
            except OSError as err:  # name the file the user knows, not the temporary one
                raise OSError(err.errno, err.strerror or str(err), str(path)) from err
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp"):
    """A temporary path beside `path`, ending in `suffix` (default ".tmp"), for a writer that wants a file
    name (matplotlib, the ONNX exporter); renamed over `path` when the block ends without error, removed
    otherwise. An OSError inside names `path`, not the temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except OSError as err:
        raise OSError(f"could not write {path}: {err}") from err
    finally:
        Path(temporary).unlink(missing_ok=True)
