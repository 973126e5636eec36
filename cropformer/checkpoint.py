"""Checkpoints: written atomically, loaded without executing pickled code.

Two formats:
- training checkpoints (`.pth`): model, optimiser, scheduler, scaler, RNG states of every rank, data
  position, iteration and the resolved config, saved with `torch.save` to a temporary file in the same
  folder, fsynced, then renamed over the target (a crash mid-write leaves the previous file intact);
  loaded with `torch.load(weights_only=True)`, so nothing in the file can run code.
- exported weights (`.safetensors`): the model's state dict, with the resolved config as JSON in the
  file's metadata (and beside it as `<name>.json`).
Official checkpoints of the original implementation are recognised by their key names and converted
through the rename table in `cropformer.convert`.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, from_dict, to_dict
from .convert import original_to_ours


def atomic_write(path: str | Path, write_fn) -> None:
    """Call `write_fn(tmp_path)`, fsync, then rename over `path` (same filesystem, so atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def rng_state() -> dict:
    """RNG states of python, numpy and torch (CPU and CUDA) as weights-only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Atomically save a training checkpoint (a dict of tensors, numbers, strings and containers)."""
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_training_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types; name the file and refuse
        raise RuntimeError(f"{path}: not a loadable weights-only checkpoint ({exc})") from None


def export_weights(model: torch.nn.Module, cfg: Config, path: str | Path) -> None:
    """Write `<path>.safetensors` (+ `<path>.json` with the config) atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(to_dict(cfg)), "format": "cropformer"}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(to_dict(cfg), indent=1)))


def is_original_state_dict(state: dict) -> bool:
    return any(k.startswith(("sem_seg_head.", "backbone.")) for k in state)


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Config | None]:
    """Model weights (our names) and the stored config if any, from any supported file.

    Accepts our `.safetensors` exports, our training checkpoints, and the original implementation's
    `.pth` files (weights under "model" or at top level), converted through the rename table.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    cfg = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if "config" in meta:
            cfg = from_dict(json.loads(meta["config"]), f"{path} (metadata)")
    else:
        obj = load_training_checkpoint(path)
        if isinstance(obj, dict) and "config" in obj and isinstance(obj["config"], dict):
            cfg = from_dict(obj["config"], f"{path} (config)")
        state = obj.get("model", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise RuntimeError(f"{path}: no state dict of tensors found (keys: {list(obj)[:10]})")
    if is_original_state_dict(state):
        state, report = original_to_ours(state)
        if report.unrecognised:
            raise RuntimeError(f"{path}: keys the rename table does not know: {report.unrecognised[:10]}")
    return state, cfg


def load_model_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "weights", strict: bool = True) -> dict:
    """Load a state dict, refusing (with the first mismatching keys named) one that does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if reshaped:
        raise RuntimeError(f"{source} does not fit this model (wrong backbone, query count or window?): " + "; ".join(reshaped[:5]))
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"{source} does not fit this model: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    model.load_state_dict(state, strict=False)
    return {"missing": missing, "unexpected": unexpected}
