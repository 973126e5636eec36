"""Checkpoint integrity: every format we read, damaged every way we can think of, is refused with a
CheckpointError naming the file and the problem (or, where the format has no checksum, loads with a
note saying so); intact files, older ones without a checksum included, still load."""
from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cropformer.checkpoint import (
    CHECKSUM_KEY,
    CheckpointError,
    content_digest,
    load_training_checkpoint,
    read_weights,
    rng_state,
    save_training_checkpoint,
    save_weights,
)
from cropformer.config import load_config
from cropformer.modeling.build import build_model

# A PNG header, some text, and bytes that look like nothing: files a user may pass by mistake.
FOREIGN = {"png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "text": b"hello, not a checkpoint\n",
           "random": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()}


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny")
    torch.manual_seed(0)
    state = build_model(cfg.model).state_dict()
    return cfg, state


def _largest(state: dict) -> torch.Tensor:
    return max(state.values(), key=lambda t: t.numel() * t.element_size())


def _training_payload(state: dict, cfg) -> dict:
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 ** it)
    model(torch.randn(2, 5)).sum().backward()
    opt.step()
    sched.step()
    from cropformer.config import to_dict

    return {"model": state, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": {},
            "iteration": 7, "rng": [rng_state()], "world_size": 1, "config": to_dict(cfg)}


def _write(kind: str, tmp_path, cfg, state):
    """Write `state` in format `kind`; returns (path, loader)."""
    if kind == "safetensors":
        path = tmp_path / "w.safetensors"
        save_weights(state, path, cfg)
        return path, read_weights
    if kind == "weights-pth":
        path = tmp_path / "w.pth"
        save_weights(state, path, cfg)
        return path, read_weights
    if kind == "training":
        path = tmp_path / "last_checkpoint.pth"
        save_training_checkpoint(path, _training_payload(state, cfg))
        return path, load_training_checkpoint
    if kind == "zip-pth":  # an official (detectron2) or older .pth of ours: torch.save's zip, no checksum of ours
        path = tmp_path / "official.pth"
        torch.save({"model": state, "iteration": 90000}, path)
        return path, read_weights
    if kind == "legacy-pth":  # torch.save's format before torch 1.6
        path = tmp_path / "legacy.pth"
        torch.save({"model": state}, path, _use_new_zipfile_serialization=False)
        return path, read_weights
    if kind == "pkl":  # detectron2 .pkl: a pickled dict of numpy arrays
        path = tmp_path / "d2.pkl"
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in state.items()}}, f, protocol=4)
        return path, read_weights
    raise AssertionError(kind)


OURS = ["safetensors", "weights-pth", "training"]
CHECKED = OURS + ["zip-pth"]  # formats whose content is covered by a checksum (ours: content_digest, zip: CRC-32)
ALL = CHECKED + ["legacy-pth", "pkl"]


@pytest.mark.parametrize("kind", ALL)
def test_intact_files_load_exactly(tmp_path, tiny, kind):
    cfg, state = tiny
    path, load = _write(kind, tmp_path, cfg, state)
    loaded = load(path)
    got = loaded["model"] if kind == "training" else loaded[0]
    assert sorted(got) == sorted(state)
    assert all(torch.equal(got[k], v) for k, v in state.items())
    if kind == "training":
        assert loaded["iteration"] == 7 and CHECKSUM_KEY not in loaded


def _flip(path, offset: int, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))


def _data_offset(path, tensor: torch.Tensor) -> int:
    """Where the bytes of `tensor` lie in the file (its middle, to be flipped)."""
    raw = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    sample = raw[len(raw) // 2: len(raw) // 2 + 64]
    offset = path.read_bytes().find(sample)
    assert offset > 0, "tensor bytes not found in the file"
    return offset


@pytest.mark.parametrize("kind", ALL)
def test_flipped_bytes_in_tensor_data(tmp_path, tiny, kind, caplog):
    cfg, state = tiny
    path, load = _write(kind, tmp_path, cfg, state)
    _flip(path, _data_offset(path, _largest(state)))
    if kind in CHECKED:
        with pytest.raises(CheckpointError, match=rf"^{path}: corrupt: .*(checksum|CRC-32)"):
            load(path)
    else:  # these formats carry no checksum: the damage cannot be seen, and loading says so
        with caplog.at_level(logging.WARNING, logger="cropformer.checkpoint"):
            load(path)
        assert f"{path} carries no checksum" in caplog.text


def test_changed_config_in_safetensors_header_is_refused(tmp_path, tiny):
    """The header stays valid JSON (one digit changed), so only the checksum can tell."""
    cfg, state = tiny
    path, _ = _write("safetensors", tmp_path, cfg, state)
    data = path.read_bytes()
    at = data.index(b"embed_dim") + len(b'embed_dim\\": ')
    assert data[at:at + 1].isdigit()
    path.write_bytes(data[:at] + (b"1" if data[at:at + 1] != b"1" else b"2") + data[at + 1:])
    with pytest.raises(CheckpointError, match="corrupt: its content does not match the checksum"):
        read_weights(path)


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("keep", [7, 0.5, -1], ids=["7-bytes", "half", "all-but-1"])
def test_truncated_files_are_refused(tmp_path, tiny, kind, keep):
    cfg, state = tiny
    path, load = _write(kind, tmp_path, cfg, state)
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match=rf"^{path}: .*(truncated|corrupt|not a loadable)"):
        load(path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".pkl"])
@pytest.mark.parametrize("content", sorted(FOREIGN))
def test_foreign_files_are_refused(tmp_path, suffix, content):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(FOREIGN[content])
    with pytest.raises(CheckpointError, match=rf"^{path}: "):
        read_weights(path)
    with pytest.raises(CheckpointError, match=rf"^{path}: "):
        load_training_checkpoint(path)


@pytest.mark.parametrize("load", [read_weights, load_training_checkpoint])
def test_missing_empty_and_folder(tmp_path, load):
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'nope.pth'}: no such file"):
        load(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pth: empty file \(0 bytes\)"):
        load(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}: not a file"):
        load(tmp_path)


@pytest.mark.parametrize("kind", ["safetensors", "weights-pth", "zip-pth"])
def test_weights_are_not_a_training_checkpoint(tmp_path, tiny, kind):
    cfg, state = tiny
    path, _ = _write(kind, tmp_path, cfg, state)
    with pytest.raises(CheckpointError, match="not a training checkpoint.*--init"):
        load_training_checkpoint(path)


def test_files_written_before_checksums_load_with_a_note(tmp_path, tiny, caplog):
    cfg, state = tiny
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "old.safetensors", metadata={"format": "cropformer"})
    torch.save({"model": state}, tmp_path / "old.pth")  # what save_weights wrote before: CRC-32s only
    with caplog.at_level(logging.WARNING, logger="cropformer.checkpoint"):
        for name in ("old.safetensors", "old.pth"):
            got, _ = read_weights(tmp_path / name)
            assert all(torch.equal(got[k], v) for k, v in state.items())
    assert "old.safetensors carries no checksum (written before CropFormer added checksums)" in caplog.text
    assert "old.pth" not in caplog.text  # its zip CRC-32s were checked


def test_content_digest_sees_every_part(tiny):
    _, state = tiny
    small = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": {"lr": 0.1, "betas": (0.9, 0.999)}, "n": None}
    base = content_digest(small)
    assert content_digest(dict(reversed(small.items()))) == base  # dict order does not matter
    assert content_digest({**small, "b": {"lr": 0.1, "betas": [0.9, 0.999]}}) == base  # tuple read back as a list
    changed = [
        {**small, "a": small["a"].reshape(3, 2)},
        {**small, "a": small["a"].double()},
        {**small, "a": small["a"] + torch.tensor([[0, 0, 0], [0, 0, 1e-5]])},
        {**small, "b": {"lr": 0.1000001, "betas": (0.9, 0.999)}},
        {**{k: v for k, v in small.items() if k != "n"}, "c": None},
        {**small, "n": 0},
        {**small, "n": False},
    ]
    digests = {content_digest(c) for c in changed}
    assert base not in digests and len(digests) == len(changed)
    assert content_digest({"x": torch.ones(3, dtype=torch.bfloat16), "y": torch.zeros(0), "z": torch.tensor(True)})
    with pytest.raises(TypeError, match="cannot checksum a object"):
        content_digest({"x": object()})


def test_unreadable_config_in_foreign_metadata_names_the_file(tmp_path, tiny):
    """A file without our checksum whose stored config is not JSON: refused naming the file."""
    _, state = tiny
    path = tmp_path / "odd.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"config": "{'not': json"})
    with pytest.raises(CheckpointError, match=rf"^{path}: the config in its metadata is not valid JSON"):
        read_weights(path)
