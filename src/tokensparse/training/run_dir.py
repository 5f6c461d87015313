"""The run folder: its claim (one folder, one run), config.json, metrics.jsonl, the per-epoch
checkpoints and training state, written atomically, and every random state a resume needs."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoints import atomic_write_bytes, read_state_dict, save_checkpoint
from ..config import TrainConfig


def rng_state(loader: torch.utils.data.DataLoader | None = None) -> dict[str, Any]:
    """This process's random state: torch (CPU, CUDA), Python, NumPy (Mixup) and the loader's generator."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(py_state),
        "python_version": py_version,
        "python_gauss": py_gauss,
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
    }
    if loader is not None and loader.generator is not None:
        state["loader"] = loader.generator.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], loader: torch.utils.data.DataLoader | None = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "numpy" in state:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "loader" in state and loader is not None and loader.generator is not None:
        loader.generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def all_rng_states(world: int, loader: torch.utils.data.DataLoader) -> list[dict[str, Any]]:
    """Every rank's random state, on every rank (a collective: all ranks call it)."""
    mine = rng_state(loader)
    if world == 1:
        return [mine]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    return gathered


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(buffer.getvalue(), path)


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write_bytes(text.encode(), path)


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None: JSON has no NaN (json.dumps would write it)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl, rewritten whole from the history (which the checkpoint state also holds)."""
    lines = (json.dumps(json_safe(m), allow_nan=False) + "\n" for m in history)
    atomic_write_text("".join(lines), path)


def checkpoint_epoch(path: Path) -> int | None:
    digits = path.name.removeprefix("epoch")[:4]
    return int(digits) if path.name.startswith("epoch") and digits.isdigit() else None


def clean_checkpoints(ckpt: Path, last: int | None, keep: int) -> None:
    """Delete temporary files of interrupted writes, files of epochs after `last` (a killed epoch's)
    and all but the `keep` newest complete epochs."""
    for tmp in ckpt.parent.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    if not ckpt.is_dir():
        return
    for tmp in ckpt.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    epochs = sorted({e for f in ckpt.glob("epoch*") if (e := checkpoint_epoch(f)) is not None})
    kept = [e for e in epochs if last is not None and e <= last][-keep:]
    for f in ckpt.glob("epoch*"):
        if checkpoint_epoch(f) is not None and checkpoint_epoch(f) not in kept:
            f.unlink(missing_ok=True)


def save_training_state(
    out: Path, epoch: int, model, optimizer, scheduler, scaler, extra: dict, keep: int
) -> None:
    """Weights (safetensors) and state (tensors and plain values only), then the `last.json` pointer.

    `extra` holds what resuming needs beyond the modules: the update count, the metrics history and
    every rank's random state. A kill at any moment leaves `last.json` naming a complete pair.
    """
    ckpt = out / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, ckpt / f"epoch{epoch:04d}.safetensors", {"epoch": epoch})
    state = {
        "epoch": epoch,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        **extra,
    }
    atomic_torch_save(state, ckpt / f"epoch{epoch:04d}.state.pt")
    atomic_write_text(json.dumps({"epoch": epoch}), ckpt / "last.json")
    clean_checkpoints(ckpt, epoch, keep)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupt (not JSON: {err}); delete it or the run folder") from err


def load_training_state(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    pointer = out / "checkpoints" / "last.json"
    if not pointer.is_file():
        return None
    saved = read_json(pointer)
    if not isinstance(saved, dict) or not isinstance(saved.get("epoch"), int):
        raise ValueError(f'{pointer} is corrupt: expected {{"epoch": <int>}}, got {saved!r}')
    epoch = saved["epoch"]
    weights_file = out / "checkpoints" / f"epoch{epoch:04d}.safetensors"
    state_file = out / "checkpoints" / f"epoch{epoch:04d}.state.pt"
    for f in (weights_file, state_file):
        if not f.is_file():
            raise ValueError(f"cannot resume: {pointer} names epoch {epoch} but {f} is missing")
    weights = read_state_dict(weights_file)
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged file
        raise ValueError(f"cannot resume: {state_file} is not a readable training state ({err})") from err
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng"} <= set(state):
        raise ValueError(f"cannot resume: {state_file} is not a training state of tokensparse")
    return weights, state


# fields a resumed run may change: they do not change what is computed (epochs extends the schedule)
RESUME_MAY_CHANGE = (
    "epochs",
    "resume",
    "overwrite",
    "output",
    "device",
    "keep_checkpoints",
    "max_nan_streak",
    "workers",  # each canvas comes from its own (seed, split, epoch, index) key: the same data in any process
)
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "model.safetensors")


def config_differences(
    cfg: TrainConfig, saved: dict[str, Any], extra: dict[str, Any], ignored: tuple[str, ...]
) -> list[str]:
    """'key: saved -> now' for each setting of `cfg` (with the run facts `extra` train() derives) in
    which a run's saved config.json differs, `ignored` aside; a key the file lacks is at its default."""
    now = json.loads(json.dumps(dataclasses.asdict(cfg) | extra))
    defaults = {f.name: getattr(TrainConfig(), f.name) for f in dataclasses.fields(TrainConfig)}
    return [
        f"{key}: {saved.get(key, defaults.get(key))!r} -> {value!r}"
        for key, value in now.items()
        if key not in ignored and saved.get(key, defaults.get(key)) != value
    ]


def claim_output(cfg: TrainConfig, out: Path, extra: dict[str, Any], is_main: bool) -> dict | None:
    """Make sure the run folder belongs to this run; return the saved config when resuming one.

    A new run refuses a folder holding another run (unless `overwrite`, which deletes that run's
    files); `resume` refuses a run whose configuration differs in anything but `RESUME_MAY_CHANGE`.
    """
    used = [name for name in RUN_FILES if (out / name).exists()]
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run or replace it")
    if used == ["config.json"]:
        # a run that stopped before its first checkpoint (a failed start-up) holds nothing to keep
        used = []
    if not used:
        return None
    if not cfg.resume:
        if not cfg.overwrite:
            raise ValueError(
                f"{out} already holds a run ({', '.join(used)}): continue it with --resume, replace it "
                "with --overwrite, or choose another --output"
            )
        if is_main:
            import shutil

            for name in (*RUN_FILES, "teacher.safetensors", "tensorboard"):
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        return None
    config_file = out / "config.json"
    if not config_file.is_file():
        raise ValueError(f"cannot resume: {out} holds {', '.join(used)} but no config.json")
    saved = read_json(config_file)
    if not isinstance(saved, dict):
        raise ValueError(f"{config_file} is corrupt: expected a JSON object")
    differences = config_differences(cfg, saved, extra, RESUME_MAY_CHANGE)
    if differences:
        raise ValueError(
            f"cannot resume {out}: its run has another configuration ({'; '.join(differences)}); only "
            "--epochs may change on resume. Use another --output, or --overwrite to start afresh"
        )
    return saved


def read_metrics(path: Path, last_epoch: int) -> list[dict[str, Any]]:
    """The metric lines up to `last_epoch` (checkpoints of older versions hold no history)."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return [m for m in map(json.loads, lines) if m["epoch"] <= last_epoch]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is corrupt ({err})") from err


class RunLock:
    """An exclusive lock on a run folder (`.lock`, an OS file lock): one process trains in a folder.

    The OS drops the lock when its process ends, however it ends, so a lock is never stale; a second
    process (a `--resume` started beside workers a killed launcher left running) is refused with the
    holder's pid."""

    def __init__(self, out: Path) -> None:
        import fcntl

        out.mkdir(parents=True, exist_ok=True)
        self.path = out / ".lock"
        self.handle = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "?"
            self.handle.close()
            raise ValueError(
                f"{out} is in use by another training process (pid {holder}): wait for it to finish or stop "
                "it (a killed torchrun launcher can leave its workers running)"
            ) from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"{os.getpid()}\n")
        self.handle.flush()

    def release(self) -> None:
        if not self.handle.closed:
            self.handle.close()
