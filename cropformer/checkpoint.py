"""Checkpoints: written atomically, read without executing code from the file.

Our formats:
- training checkpoints (`.pth`): model, optimiser, scheduler, scaler, RNG states of every rank, data
  position, iteration and the resolved config, saved with `torch.save` to a temporary file in the same
  folder, fsynced, then renamed over the target (a crash mid-write leaves the previous file intact);
  loaded with `torch.load(weights_only=True)`, so nothing in the file can run code.
- weights (`.safetensors`): our state dict, with the resolved config as JSON in the file's metadata
  and beside it as `<name>.json`; or a weights-only `.pth` ({"model": state[, "config": dict]}).

Files from elsewhere (`read_checkpoint`): the original's detectron2 `.pth` (weights under "model" or at
the top level), detectron2 `.pkl` files (pickled dicts of numpy arrays, or of torch tensors as
Mask2Former's converted Swin weights), official Swin / HorNet / torchvision ImageNet `.pth`, and HF
Mask2Former `.safetensors` / `.bin`. Torch files are read with `weights_only=True`; other pickles with
`SafeUnpickler`, which builds only numpy arrays, torch tensors and plain containers and refuses any
other global, so a malicious file fails before anything runs. Key names are converted through
`cropformer.convert`, and `check_fit` refuses weights that do not fit a model, naming the first
mismatching keys (`load_model_weights`).

Integrity: our files carry a checksum of their content (`content_digest`: every tensor's bytes, dtype
and shape, and every other value, so a changed config or key name counts too), under
"content_checksum" in a `.pth` payload or the `.safetensors` metadata, checked on every load. Official
torch.save (zip) files are checked against the CRC-32 the zip stores for each member. Other files have
no checksum to check: for safetensors we check that the header and the file size agree, for pickles
(detectron2 `.pkl`, the legacy torch.save format) that they unpickle to the end; flipped bytes inside
their arrays cannot be detected, and loading them logs a note saying so. A file that fails any check
raises `CheckpointError` naming the file and the problem.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import io
import json
import logging
import math
import os
import pickle
import random
import re
import tempfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, from_dict, to_dict
from .convert import OUR_COMPONENTS, ConversionReport, convert_state_dict, first_keys

logger = logging.getLogger(__name__)


CHECKSUM_KEY = "content_checksum"  # in a .pth payload and in .safetensors metadata


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that cannot be used: missing, empty, truncated, corrupt (its
    checksum does not match), of an unknown format, or not the kind asked for. The message names the
    file and the problem."""


def atomic_write(path: str | Path, write_fn, what: str = "file") -> None:
    """Call `write_fn(tmp_path)`, fsync, then rename over `path` (same filesystem, so atomic: a crash
    leaves the previous file intact).

    Temporary files of earlier writes of `path` that were killed are removed first (one writer per
    file). A full disk raises OSError(ENOSPC) saying that the previous `what` is intact; the temporary
    file never outlives a failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except Exception as exc:
        if _out_of_space(exc, path.parent):  # checked while the temporary file still holds its space
            kept = f"previous {what} {path} is intact" if path.exists() else f"{path} was not created"
            raise OSError(errno.ENOSPC, f"no space left on device writing {path}; {kept}") from exc
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _out_of_space(exc: BaseException, folder: Path) -> bool:
    """Did a write fail for lack of space? An ENOSPC/EDQUOT anywhere in the exception chain (safetensors'
    Rust writer spells it "(os error 28)"), or a full filesystem (torch's writer reports it in its own
    words: "unexpected pos")."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(f"(os error {e})" in str(exc) for e in (errno.ENOSPC, errno.EDQUOT)):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    try:
        return os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# Content checksums


def _structure(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """`obj` as JSON-able data in a canonical order, each tensor replaced by its dtype and shape and
    appended to `tensors` (whose bytes are hashed separately)."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {"tensor": [str(obj.dtype), list(obj.shape)]}
    if isinstance(obj, dict):  # sorted: safetensors does not keep the order tensors were given in
        keys = sorted(obj, key=lambda k: (type(k).__name__, str(k)))
        return {"dict": [[_structure(k, tensors), _structure(obj[k], tensors)] for k in keys]}
    if isinstance(obj, (list, tuple)):  # one kind: a tuple may come back from a file as a list
        return {"list": [_structure(v, tensors) for v in obj]}
    if isinstance(obj, float):
        return {"float": repr(obj)}  # exact, and JSON has no nan/inf
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    raise TypeError(f"cannot checksum a {type(obj).__name__} in a checkpoint payload")


def _tensor_crc32(t: torch.Tensor) -> int:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return zlib.crc32(flat.view(torch.uint8).numpy())


def content_digest(obj: Any) -> str:
    """Checksum (64 hex digits) of a payload of nested dicts, lists, tensors (dtype, shape and bytes),
    strings, numbers and None, independent of dict order: the SHA-256 of its structure and of the
    CRC-32 of each tensor's bytes.

    CRC-32, as in zip files, catches accidental damage (flipped, zeroed or lost bytes) at a fraction
    of SHA-256's cost (docs/BENCHMARKS.md); it is no defence against deliberate tampering, which
    cannot run code anyway (weights-only loading). Tensors are checked on a few threads (zlib releases
    the GIL), one tensor per task so that at most that many are copied at once (CUDA or non-contiguous).
    """
    tensors: list[torch.Tensor] = []
    text = json.dumps(_structure(obj, tensors), separators=(",", ":"))
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        crcs = list(pool.map(_tensor_crc32, tensors))
    return hashlib.sha256(text.encode() + np.array(crcs, dtype=np.uint32).tobytes()).hexdigest()


def _with_checksum(payload: dict) -> dict:
    return {**payload, CHECKSUM_KEY: content_digest(payload)}


def _verify(path: Path, content: Any, stored: Any) -> None:
    found = content_digest(content)
    if stored != found:
        raise CheckpointError(f"{path}: corrupt: its content does not match the checksum stored in it "
                              f"({str(stored)[:12]}... stored, {found[:12]}... found); the file was damaged "
                              "after it was written, use another copy")


def _note_unverified(path: Path, why: str) -> None:
    logger.warning("note: %s carries no checksum (%s): its structure was checked, flipped bytes in its "
                   "data would go unnoticed", path, why)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes)")
    return path


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def _zip_problem(path: Path) -> str | None:
    """What is wrong with a zip file: None when its structure and every member's CRC-32 check out."""
    if not zipfile.is_zipfile(path):
        return "truncated: the zip archive has no end record (the write or the copy was cut short)"
    try:
        with zipfile.ZipFile(path) as zf:
            if all(i.CRC == 0 for i in zf.infolist() if i.file_size):  # torch.save with CRCs switched off
                _note_unverified(path, "written without CRC-32s")
                return None
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"corrupt zip archive ({_one_line(exc)})"
    return f"corrupt: zip member {bad} fails its CRC-32 check; the file was damaged, use another copy" if bad else None


def _load_torch(path: Path) -> Any:
    """A torch.save file (zip or legacy format) read weights-only, its checksum verified: ours the
    checksum under CHECKSUM_KEY (removed from the result), other zip files the members' CRC-32."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's errors come in many types; name the file and say what is wrong
        problem = _zip_problem(path) if _starts_with(path, b"PK\x03\x04") else None
        raise CheckpointError(f"{path}: {problem or f'not a loadable weights-only checkpoint ({_one_line(exc)})'}") from None
    if isinstance(obj, dict) and CHECKSUM_KEY in obj:
        stored = obj.pop(CHECKSUM_KEY)
        _verify(path, obj, stored)
    elif zipfile.is_zipfile(path):
        problem = _zip_problem(path)
        if problem:
            raise CheckpointError(f"{path}: {problem}")
    else:
        _note_unverified(path, "the legacy torch.save format has none")
    return obj


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
    """Atomically save a training checkpoint (a dict of tensors, numbers, strings and containers) with
    the checksum of its content."""
    payload = _with_checksum(payload)
    atomic_write(path, lambda tmp: torch.save(payload, tmp), what="checkpoint")


_TRAINING_KEYS = ("model", "optimizer", "scheduler", "iteration", "rng")


def load_training_checkpoint(path: str | Path) -> dict:
    """A training checkpoint (`save_training_checkpoint`), read weights-only and verified; raises
    CheckpointError for a damaged file or one that is not a training checkpoint."""
    path = _check_file(path)
    obj = None if path.suffix == ".safetensors" else _load_torch(path)
    if not isinstance(obj, dict) or any(k not in obj for k in _TRAINING_KEYS):
        raise CheckpointError(f"{path}: not a training checkpoint (no optimizer state and iteration); resume from "
                              "a last_checkpoint.pth, and start from weights with --init")
    return obj


# --------------------------------------------------------------------------------------------------
# Reading pickles without running their code


def _numpy_module(name: str):
    """numpy's `core` submodules, named `numpy.core.*` in pickles from numpy 1 and `numpy._core.*`
    from numpy 2; either name resolves to the installed module."""
    import importlib

    core = "numpy._core" if hasattr(np, "_core") else "numpy.core"
    return importlib.import_module(f"{core}.{name}")


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """`torch._utils._rebuild_tensor_v2` without the hooks and metadata a pickle could carry."""
    untyped = storage._untyped_storage if isinstance(storage, torch.TypedStorage) else storage
    return torch.empty(0, dtype=storage.dtype).set_(untyped, storage_offset, size, stride)


def _storage_from_bytes(data: bytes):
    """`torch.storage._load_from_bytes`, but weights-only: the bytes are a torch.save'd storage."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import codecs
    import collections

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        # protocol-2 pickles written by Python 3 spell bytes as _codecs.encode(str, "latin1")
        ("_codecs", "encode"): codecs.encode,
        # torch tensors pickled with plain pickle (Mask2Former's convert-pretrained-swin-model-to-d2.py)
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    }
    multiarray, numeric = _numpy_module("multiarray"), _numpy_module("numeric")
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """Unpickler for detectron2 `.pkl` weights: builds numpy arrays, torch tensors and plain containers
    (dict, list, tuple, str, numbers) and refuses every other global, so unpickling cannot call
    os.system, open, eval or any constructor with side effects."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str):
        if SafeUnpickler._allowed is None:
            SafeUnpickler._allowed = _allowed_globals()
        try:
            return SafeUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays, torch tensors and plain "
                "containers are allowed in a weights pickle"
            ) from None


_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first object of a non-zip torch.save file


def load_pickled(path: str | Path) -> Any:
    """The object in a `.pth` / `.pkl` / `.bin` file, built without running code from the file.

    torch.save files (zip, or the legacy format) go through `torch.load(weights_only=True)`; any other
    pickle (detectron2 `.pkl`, numpy or torch objects pickled by `pickle.dump`, Python 2 pickles
    included) through `SafeUnpickler`. Raises CheckpointError naming the file when either refuses or
    the file is damaged (see the module docstring for what can be checked).
    """
    path = _check_file(path)
    if _starts_with(path, b"PK\x03\x04"):  # a zip: torch.save's format (or a truncated copy of one)
        return _load_torch(path)
    try:
        with open(path, "rb") as f:
            obj = SafeUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # pickle errors come in many types; name the file and refuse
        with open(path, "rb") as f:
            head = f.read(8)
        raise CheckpointError(f"{path}: not a loadable weights pickle (nor a torch.save zip), or truncated: "
                              f"{_one_line(exc)}; the file starts with {head!r}") from None
    if isinstance(obj, int) and obj == _TORCH_LEGACY_MAGIC:
        return _load_torch(path)
    _note_unverified(path, "pickle files have none")
    return obj


# --------------------------------------------------------------------------------------------------
# Reading weights of any supported kind


@dataclass
class LoadedWeights:
    """Weights read from a file: `state` in our names, the stored `config` (None when the file has
    none) and the `report` of the key conversion."""

    state: dict[str, torch.Tensor]
    config: Config | None
    report: ConversionReport


def _as_tensor(key: str, value, path: Path) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
        value = np.ascontiguousarray(value)
        return torch.from_numpy(value if value.flags.writeable else value.copy())  # protocol 5 gives read-only views
    raise CheckpointError(f"{path}: entry {key!r} is not a numeric tensor or array ({type(value).__name__})")


def _find_state(obj: Any, path: Path) -> dict[str, Any]:
    """The state dict inside a loaded checkpoint: under "model" (detectron2, official Swin/HorNet, ours),
    "state_dict", or "blobs" (Caffe2), else the top level."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of weights, found a {type(obj).__name__}")
    for key in ("model", "state_dict", "blobs"):
        if isinstance(obj.get(key), dict):
            return obj[key]
    if obj and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in obj.values()):
        return obj
    raise CheckpointError(f"{path}: no state dict found (top-level keys: {first_keys([str(k) for k in obj], 10)})")


def read_checkpoint(path: str | Path) -> LoadedWeights:
    """Weights in our names, the stored config and the conversion report, from any supported file.

    Accepts our `.safetensors` exports and `.pth` files (weights or training checkpoints), the original
    implementation's checkpoints, ImageNet backbone weights and HF Mask2Former weights (see
    `cropformer.convert`). Raises CheckpointError for a damaged file, unrecognised keys or a file it
    will not unpickle.
    """
    path = _check_file(path)
    cfg = None
    if path.suffix == ".safetensors":
        raw, meta = _read_safetensors(path)
        if "config" in meta:
            try:
                stored_cfg = json.loads(meta["config"])
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{path}: the config in its metadata is not valid JSON ({exc})") from None
            cfg = from_dict(stored_cfg, f"{path} (metadata)")
    else:
        obj = load_pickled(path)
        if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
            cfg = from_dict(obj["config"], f"{path} (config)")
        raw = {str(k): _as_tensor(str(k), v, path) for k, v in _find_state(obj, path).items()}
    try:
        state, report = convert_state_dict(raw)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if report.unrecognised:
        raise CheckpointError(f"{path}: keys the {report.format} rename table does not know: {first_keys(report.unrecognised)}")
    return LoadedWeights(state, cfg, report)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a `.safetensors` file, its size checked against its header and its
    checksum verified (files without one load with a note)."""
    from safetensors import safe_open

    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or 8 + n > size:
            raise CheckpointError(f"{path}: truncated, or not a safetensors file (it announces a {n}-byte header; "
                                  f"the file has {size} bytes)")
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({type(exc).__name__}: {_one_line(exc)})") from None
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: {'truncated' if size < 8 + n + end else 'corrupt'}: the file has {size} "
                              f"bytes, its header describes {8 + n + end}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # SafetensorError and friends: name the file
        raise CheckpointError(f"{path}: corrupt safetensors file ({_one_line(exc)})") from None
    stored = meta.pop(CHECKSUM_KEY, None)
    if stored is not None:
        _verify(path, {"metadata": meta, "tensors": raw}, stored)
    else:
        _note_unverified(path, "written before CropFormer added checksums" if meta.get("format") == "cropformer"
                         else "not written by CropFormer")
    return raw, meta


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Config | None]:
    """Model weights (our names) and the stored config if any, from any supported file
    (`read_checkpoint`); the conversion report is logged."""
    loaded = read_checkpoint(path)
    if loaded.report.format != "cropformer":
        logger.info("%s: %s", path, loaded.report.summary())
    return loaded.state, loaded.config


def is_original_state_dict(state: dict) -> bool:
    return any(k.startswith(("sem_seg_head.", "backbone.")) for k in state)


# --------------------------------------------------------------------------------------------------
# Writing weights


def save_weights(state: dict[str, torch.Tensor], path: str | Path, cfg: Config | None = None,
                 metadata: dict[str, str] | None = None) -> None:
    """Write weights in our names atomically, with the checksum of their content: `.safetensors` (config
    in the metadata and, when given, beside it as `<name>.json`) or a weights-only `.pth`
    ({"model": state[, "config": dict], "content_checksum": hex})."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        if t.untyped_storage().data_ptr() in seen:  # safetensors refuses tensors sharing memory
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[k] = t
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {"format": "cropformer", **(metadata or {})}
        if cfg is not None:
            meta["config"] = json.dumps(to_dict(cfg))
        meta[CHECKSUM_KEY] = content_digest({"metadata": meta, "tensors": tensors})
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), what="weights file")
        if cfg is not None:
            atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(to_dict(cfg), indent=1)),
                         what="config")
    elif path.suffix == ".pth":
        payload: dict[str, Any] = {"model": tensors}
        if cfg is not None:
            payload["config"] = to_dict(cfg)
        payload = _with_checksum(payload)
        atomic_write(path, lambda tmp: torch.save(payload, tmp), what="weights file")
    else:
        raise ValueError(f"{path}: weights are written as .safetensors or .pth")


def export_weights(model: torch.nn.Module, cfg: Config, path: str | Path) -> None:
    """Write `<path>.safetensors` (+ `<path>.json` with the config) atomically."""
    save_weights(model.state_dict(), path, cfg)


# --------------------------------------------------------------------------------------------------
# Does a state dict fit a model?

# Missing from a checkpoint without harm: constants the model computes itself (Swin's relative position
# index from the window size) and BatchNorm's step counter (unused at our momentum).
_IGNORABLE_MISSING = re.compile(r"(^|\.)(relative_position_index|num_batches_tracked)$")
_IGNORABLE_UNEXPECTED = re.compile(r"(^|\.)num_batches_tracked$")
# Missing from a partial (non-strict) load without refusal: detectron2's per-level output norms, which
# ImageNet classification weights do not have; they keep their initial values.
_PARTIAL_OK = re.compile(r"^image_encoder\.norm\d\.")


class WeightsMismatch(RuntimeError):
    """Weights that do not fit the model built from the config. The message names the first
    mismatching keys; `reshaped` ("key: weights shape vs model shape"), `unexpected` and `missing`
    hold all of them."""

    def __init__(self, message: str, reshaped=(), unexpected=(), missing=()):
        super().__init__(message)
        self.reshaped, self.unexpected, self.missing = list(reshaped), list(unexpected), list(missing)


@dataclass
class FitReport:
    """How a state dict fits a model: `missing` / `unexpected` keys (tolerated ones; a refusal raises
    instead), `ignored` harmless differences and the model components the weights do not cover."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    absent_components: list[str] = field(default_factory=list)

    def summary(self, limit: int = 10) -> str:
        lines = [f"fits the model: {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                 f"{len(self.ignored)} ignored"]
        if self.absent_components:
            lines.append(f"  not in the weights (keep their initial values): {', '.join(self.absent_components)}")
        for name, keys in (("missing", self.missing), ("unexpected (left out)", self.unexpected), ("ignored", self.ignored)):
            if keys:
                lines.append(f"  {name}: {first_keys(keys, limit)}")
        return "\n".join(lines)


def _component(key: str) -> str:
    return key.split(".", 1)[0]


def describe_backbone(shapes: dict[str, Any]) -> str:
    """A short description of the image encoder in a state dict (tensors or shapes), e.g.
    "Swin (embed 96, depths 2-2-6-2, window 7)", for mismatch messages."""

    def depths(pattern: str) -> str:
        blocks: dict[int, set[int]] = {}
        for k in shapes:
            m = re.match(pattern, k)
            if m:
                blocks.setdefault(int(m[1]), set()).add(int(m[2]))
        return "-".join(str(len(blocks[i])) for i in sorted(blocks))

    def shape(key: str) -> tuple[int, ...]:
        return tuple(shapes[key].shape if hasattr(shapes[key], "shape") else shapes[key])

    if "image_encoder.patch_embed.proj.weight" in shapes:
        table = next((k for k in shapes if k.endswith("relative_position_bias_table")), None)
        window = f", window {(math.isqrt(shape(table)[0]) + 1) // 2}" if table else ""
        blocks = depths(r"^image_encoder\.layers\.(\d+)\.blocks\.(\d+)\.")
        return f"Swin (embed {shape('image_encoder.patch_embed.proj.weight')[0]}, depths {blocks}{window})"
    if "image_encoder.downsample_layers.0.0.weight" in shapes:
        blocks = depths(r"^image_encoder\.stages\.(\d+)\.(\d+)\.")
        return f"HorNet (base dim {shape('image_encoder.downsample_layers.0.0.weight')[0]}, depths {blocks})"
    if "image_encoder.stem.conv1.weight" in shapes:
        return "ResNet (blocks " + depths(r"^image_encoder\.res(\d)\.(\d+)\.") + ")"
    return "no known image encoder" if not any(k.startswith("image_encoder.") for k in shapes) else "an unknown image encoder"


def _hints(own: dict[str, Any], state: dict[str, torch.Tensor], reshaped: list[str], bad: list[str]) -> list[str]:
    """What the mismatching keys say about the config, in words."""
    hints = []
    if "image_decoder.query_feat.weight" in reshaped:
        hints.append(f"number of queries: weights {state['image_decoder.query_feat.weight'].shape[0]}, "
                     f"model {own['image_decoder.query_feat.weight'].shape[0]} (model.decoder.num_queries)")
    table = next((k for k in reshaped if k.endswith("relative_position_bias_table")), None)
    if table is not None:
        window = [(math.isqrt(t[table].shape[0]) + 1) // 2 for t in (state, own)]
        hints.append(f"Swin window size: weights {window[0]}, model {window[1]} (model.backbone.swin.window_size)")
    filt = next((k for k in reshaped if k.endswith("complex_weight")), None)
    if filt is not None:
        hints.append(f"HorNet global filter: weights {tuple(state[filt].shape[1:3])}, model "
                     f"{tuple(own[filt].shape[1:3])} (weights made for another input resolution)")
    ckpt, model = describe_backbone(state), describe_backbone(own)
    if any(k.startswith("image_encoder.") for k in bad) and ckpt != model and ckpt != "no known image encoder":
        hints.append(f"image encoder: weights {ckpt}, model {model}")
    if any(k.startswith("image_decoder.") for k in reshaped) and "image_decoder.query_feat.weight" not in reshaped:
        hints.append("decoder widths differ (model.decoder / model.pixel_decoder)")
    return hints


def check_fit(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str = "weights",
              strict: bool = True) -> FitReport:
    """Check that `state` (our names) fits a model whose state dict is `own` (meta tensors will do).

    Always refused: a key whose shape differs. strict: every key of the model present (except
    `_IGNORABLE_MISSING`) and no unexpected key. Not strict: model components (image_encoder,
    pixel_decoder, image_decoder, association) may be absent from the weights as a whole, and weights
    of a component the model lacks are left out (a CropFormer checkpoint for Mask2Former); within a
    component the weights cover, keys must match (except the image encoder's output norms, which
    ImageNet weights lack). Raises WeightsMismatch naming the first mismatching keys.
    """
    reshaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    ignored = [k for k in missing if _IGNORABLE_MISSING.search(k)] + [k for k in unexpected if _IGNORABLE_UNEXPECTED.search(k)]
    missing = [k for k in missing if not _IGNORABLE_MISSING.search(k)]
    unexpected = [k for k in unexpected if not _IGNORABLE_UNEXPECTED.search(k)]
    model_parts = {_component(k) for k in own}
    covered = {_component(k) for k in state} & model_parts
    if strict:
        bad_missing, bad_unexpected = missing, unexpected
    else:
        bad_missing = [k for k in missing if _component(k) in covered and not _PARTIAL_OK.match(k)]
        bad_unexpected = [k for k in unexpected if _component(k) in model_parts]
    if not covered:
        raise WeightsMismatch(f"{source} has no weights for this model (first keys: {first_keys(list(state), 5)})")
    if reshaped or bad_missing or bad_unexpected:
        hints = _hints(own, state, reshaped, reshaped + bad_missing + bad_unexpected)
        lines = [f"{source} does not fit this model" + (": " + "; ".join(hints) if hints else "")]
        if reshaped:
            lines.append(f"  reshaped ({len(reshaped)}, weights vs model): " + "; ".join(
                f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in reshaped[:5]) + (" ..." if len(reshaped) > 5 else ""))
        if bad_unexpected:
            lines.append(f"  unexpected ({len(bad_unexpected)}): {first_keys(bad_unexpected, 5)}")
        if bad_missing:
            lines.append(f"  missing ({len(bad_missing)}): {first_keys(bad_missing, 5)}")
        raise WeightsMismatch("\n".join(lines), [f"{k}: {list(state[k].shape)} vs {list(own[k].shape)}" for k in reshaped],
                              bad_unexpected, bad_missing)
    return FitReport(missing=missing, unexpected=unexpected, ignored=ignored,
                     absent_components=[c for c in OUR_COMPONENTS if c in model_parts - covered])


def load_model_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "weights", strict: bool = True) -> dict:
    """Load a state dict (our names) into `model`, refusing one that does not fit (`check_fit`).

    Returns {"missing": [...], "unexpected": [...], "ignored": [...], "absent_components": [...]}
    (lists are empty for a strict load, apart from ignorable constants).
    """
    own = model.state_dict()
    fit = check_fit(own, state, source=source, strict=strict)
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return {"missing": fit.missing, "unexpected": fit.unexpected, "ignored": fit.ignored,
            "absent_components": fit.absent_components}
