"""Training survives faults: SIGKILL at random moments (mid-checkpoint included) then --resume gives the
weights of an uninterrupted run; a torn metrics line is dropped; temporary files of killed writes are
removed at the next save; a full disk (a real tmpfs where we may mount one) keeps the previous
checkpoint, leaves no temporary file and says so in one line."""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cropformer import checkpoint
from cropformer.checkpoint import load_training_checkpoint, save_training_checkpoint, save_weights
from cropformer.data.synthetic import make_synthetic_dataset
from cropformer.engine import _read_history
from tests.conftest import REPO, tiny_train_overrides

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # one thread: bitwise-equal runs


def _payload(iteration: int, value: float = 1.0, n: int = 3) -> dict:
    return {"model": {"w": torch.full((n,), value)}, "optimizer": {}, "scheduler": {}, "iteration": iteration, "rng": []}


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------------------------------
# metrics.jsonl and temporary files


@pytest.mark.parametrize("tail", [b'{"iteration": 4, "total_lo', b"\xff\xfe\x00\x00"], ids=["killed mid-write", "garbage bytes"])
def test_torn_last_metrics_line_is_dropped(tmp_path, caplog, tail):
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"iteration": i, "total_loss": 10.0 - i}) for i in (1, 2, 3)]
    path.write_bytes("\n".join(good).encode() + b"\n" + tail)
    with caplog.at_level(logging.WARNING, logger="cropformer.train"):
        history = _read_history(path, upto=2)
    assert history["total_loss"] == [(1, 9.0), (2, 8.0)]
    assert path.read_text() == good[0] + "\n" + good[1] + "\n"
    assert f"{path}:4: dropped a line that is not a complete record" in caplog.text
    assert _temp_files(tmp_path) == []


def test_stale_temporary_files_are_removed_at_the_next_save(tmp_path):
    path = tmp_path / "last_checkpoint.pth"
    save_training_checkpoint(path, _payload(1))
    stale = [tmp_path / f".last_checkpoint.pth.{tag}.tmp" for tag in ("k1ll3d", "a_b")]
    for s in stale:
        s.write_bytes(path.read_bytes()[:100])
    bystanders = [tmp_path / ".model_final.safetensors.x.tmp", tmp_path / "last_checkpoint.pth.tmp", tmp_path / "notes.tmp"]
    for b in bystanders:
        b.write_text("not ours to remove")
    save_training_checkpoint(path, _payload(2))
    assert not any(s.exists() for s in stale)
    assert all(b.exists() for b in bystanders)
    assert load_training_checkpoint(path)["iteration"] == 2


@pytest.mark.parametrize("fmt", ["checkpoint", "safetensors", "pth"])
def test_full_disk_simulated_at_the_write_call(tmp_path, monkeypatch, fmt):
    """ENOSPC raised by the write itself after part of the file is written (as `write(2)` does)."""
    path = tmp_path / ("last_checkpoint.pth" if fmt == "checkpoint" else f"w.{fmt}")
    save = (lambda: save_training_checkpoint(path, _payload(2, 2.0))) if fmt == "checkpoint" else (
        lambda: save_weights({"w": torch.full((3,), 2.0)}, path))
    if fmt == "checkpoint":
        save_training_checkpoint(path, _payload(1))
    else:
        save_weights({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def full(*args, **kwargs):
        with open(args[1], "wb") as f:
            f.write(b"part of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", full)
    monkeypatch.setattr("safetensors.torch.save_file", full)
    what = {"checkpoint": "checkpoint", "safetensors": "weights file", "pth": "weights file"}[fmt]
    with pytest.raises(OSError, match=rf"^\[Errno 28\] no space left on device writing {path}; previous {what} {path} is intact$"):
        save()
    assert path.read_bytes() == before and _temp_files(tmp_path) == []


def _mount_tmpfs_script(size_kb: int, folder: Path, command: str) -> list[str]:
    """A command line running `command` with a fresh tmpfs of `size_kb` KiB mounted on `folder`, in a
    private mount namespace (the mount disappears with the process)."""
    return ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size={size_kb}k tmpfs {folder} && {command}"]


def _tmpfs_or_skip(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a real full disk needs root and unshare (to mount a small tmpfs); the simulated test covers the logic")
    probe = subprocess.run(_mount_tmpfs_script(64, tmp_path, "true"), capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({probe.stderr.strip()}); the simulated test covers the logic")


_FILL_CHILD = r"""
import json, os, sys, torch
from cropformer.checkpoint import load_training_checkpoint, read_weights, save_training_checkpoint, save_weights
folder = sys.argv[1]
payload = lambda it: {"model": {"w": torch.full((300_000,), float(it))}, "optimizer": {}, "scheduler": {}, "iteration": it, "rng": []}
out = {}
save_training_checkpoint(f"{folder}/last_checkpoint.pth", payload(1))  # 1.2 MB: fits in 2 MB
try:
    save_training_checkpoint(f"{folder}/last_checkpoint.pth", payload(2))  # needs room for both while writing
except OSError as exc:
    out["checkpoint_error"] = str(exc)
try:
    save_weights({"w": torch.ones(300_000)}, f"{folder}/w.safetensors")
except OSError as exc:
    out["weights_error"] = str(exc)
out["iteration"] = load_training_checkpoint(f"{folder}/last_checkpoint.pth")["iteration"]
out["files"] = sorted(os.listdir(folder))
print(json.dumps(out))
"""


def test_full_disk_on_a_real_tmpfs(tmp_path):
    _tmpfs_or_skip(tmp_path)
    folder = tmp_path / "disk"
    folder.mkdir()
    res = subprocess.run(_mount_tmpfs_script(2048, folder, f"{sys.executable} -c '{_FILL_CHILD}' {folder}"),
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    ckpt = folder / "last_checkpoint.pth"
    assert out["checkpoint_error"] == f"[Errno 28] no space left on device writing {ckpt}; previous checkpoint {ckpt} is intact"
    weights = folder / "w.safetensors"
    assert out["weights_error"] == f"[Errno 28] no space left on device writing {weights}; {weights} was not created"
    assert out["iteration"] == 1  # loaded with its checksum verified
    assert out["files"] == ["last_checkpoint.pth"]  # no temporary file, no partial weights


# --------------------------------------------------------------------------------------------------
# Whole training runs (subprocesses)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    make_synthetic_dataset(root / "train", 6, (96, 128), seed=0)
    return root


# The command line's own `main`, with markers on stdout around each checkpoint write so that the parent
# can kill inside one; PAUSE_BEFORE_RENAME holds the writer between fsync and rename (the state a kill
# mid-write leaves: a complete temporary file, the previous checkpoint still in place).
_TRAIN_CHILD = r"""
import os, sys, time
from cropformer import engine
from cropformer.cli import run
from cropformer.cli.train import main
real_save = engine.save_training_checkpoint
def marked(path, payload):
    print(f"SAVING {payload['iteration']}", flush=True)
    if os.environ.get("PAUSE_BEFORE_RENAME"):
        real_fsync = os.fsync
        def fsync_then_pause(fd):
            real_fsync(fd)
            print("RENAMING", flush=True)
            time.sleep(60)
        os.fsync = fsync_then_pause
    real_save(path, payload)
    print(f"SAVED {payload['iteration']}", flush=True)
engine.save_training_checkpoint = marked
sys.exit(run(main, sys.argv[1:]))
"""


def _train(overrides: list[str], *args: str, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _TRAIN_CHILD, "--cfg", "tiny", "--device", "cpu", *args, "--set", *overrides],
                            cwd=REPO, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _wait_for(proc: subprocess.Popen, prefix: str) -> bool:
    """Read the child's stdout up to a line starting with `prefix`; False when it ended first."""
    for line in proc.stdout:
        if line.startswith(prefix):
            return True
    return False


def _final_state(path: Path):
    ckpt = load_training_checkpoint(path)
    return ckpt["iteration"], ckpt["model"], ckpt["optimizer"]["state"]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tiny_data, tmp_path):
    n_iter = 6
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    overrides = lambda out: tiny_train_overrides(tiny_data, out, f"solver.max_iter={n_iter}", "solver.checkpoint_period=1",
                                                 "log_period=2")
    ref = _train(overrides(tmp_path / "ref"))
    t0 = time.perf_counter()
    assert ref.wait(timeout=600) == 0
    per_iter = (time.perf_counter() - t0) / (n_iter + 4)  # rough: start-up counts as a few iterations

    out = tmp_path / "killed"
    ckpt = out / "last_checkpoint.pth"
    # Each launch is killed in one of these ways, then resumed; the last launch runs to the end.
    plan = ["between write and rename", "inside a checkpoint write", "random moment", "inside a checkpoint write", "random moment"]
    log = []
    for how in plan + ["to the end"]:
        resume = ["--resume", str(ckpt)] if ckpt.exists() else []
        proc = _train(overrides(out), *resume, env={**ENV, "PAUSE_BEFORE_RENAME": "1"} if how == "between write and rename" else None)
        if how == "to the end":
            _wait_for(proc, "never")
            assert proc.wait(timeout=600) == 0, f"seed {seed}: {log}"
            break
        if how == "between write and rename":
            assert _wait_for(proc, "RENAMING")
        elif how == "inside a checkpoint write":
            assert _wait_for(proc, "SAVING")
            time.sleep(rng.uniform(0, 0.05))
        else:
            _wait_for(proc, "SAV")  # training has started
            time.sleep(rng.uniform(0, 2 * per_iter))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stale = _temp_files(out)
        log.append((how, load_training_checkpoint(ckpt)["iteration"] if ckpt.exists() else None, stale))
        if how == "between write and rename":
            assert len(stale) == 1, f"seed {seed}: {log}"  # the killed write's complete temporary file
    ia, ma, oa = _final_state(tmp_path / "ref" / "last_checkpoint.pth")
    ib, mb, ob = _final_state(ckpt)
    assert ia == ib == n_iter
    for k in ma:
        assert torch.equal(ma[k], mb[k]), f"seed {seed}, kills {log}: parameter {k} differs from the uninterrupted run"
    for pid in oa:
        for k in oa[pid]:
            assert torch.equal(oa[pid][k], ob[pid][k]), f"seed {seed}, kills {log}: optimiser state {pid}.{k} differs"
    metrics = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics == list(range(1, n_iter + 1)), f"seed {seed}: {log}"
    assert _temp_files(out) == [], f"seed {seed}: {log}"


@pytest.mark.slow
def test_full_disk_during_training_stops_with_one_line(tiny_data, tmp_path):
    """The tiny model's checkpoint (weights and two AdamW moments) is about 28 MB: a 40 MB disk holds one,
    not the second one's temporary file beside it."""
    _tmpfs_or_skip(tmp_path)
    out = tmp_path / "disk"
    out.mkdir()
    args = " ".join(f"'{a}'" for a in tiny_train_overrides(tiny_data, out, "solver.max_iter=3", "solver.checkpoint_period=1"))
    check = (f"{sys.executable} -c \"import os; from cropformer.checkpoint import load_training_checkpoint as load; "
             f"print('ITER', load('{out}/last_checkpoint.pth')['iteration'], sorted(os.listdir('{out}')))\"")
    res = subprocess.run(_mount_tmpfs_script(40 * 1024, out, f"{sys.executable} -m cropformer train --cfg tiny --device cpu "
                                                             f"--set {args}; echo RC=$?; {check}"),
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    ckpt = out / "last_checkpoint.pth"
    assert "RC=2" in res.stdout, res.stdout + res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: no space left on device writing {ckpt}; previous checkpoint {ckpt} is intact")
    assert "Traceback" not in res.stderr
    line = next(x for x in res.stdout.splitlines() if x.startswith("ITER"))
    assert line.startswith("ITER 1 ") and ".tmp" not in line, line


def test_demo_overlay_that_cannot_be_written_names_the_file(tiny_data, tmp_path, monkeypatch):
    """OpenCV's imwrite returns False on a full disk instead of raising; the demo says so."""
    import types

    import cv2
    import numpy as np

    from cropformer.config import load_config
    from cropformer.demo import write_overlays

    cfg = load_config("tiny", [f"data.val_json=\"{tiny_data / 'train' / 'annotations.json'}\"",
                               f"data.val_images=\"{tiny_data / 'train' / 'images'}\""])
    segmenter = types.SimpleNamespace(segment=lambda image: types.SimpleNamespace(id_map=np.zeros(image.shape[:2], np.int32)))
    monkeypatch.setattr(cv2, "imwrite", lambda *args: False)
    with pytest.raises(OSError, match="could not write the overlay") as info:
        write_overlays(segmenter, cfg, tmp_path / "overlays", limit=1)
    assert Path(info.value.filename).parent == tmp_path / "overlays"
