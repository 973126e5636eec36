"""User errors of `cropformer train` and `cropformer convert` (and the checkpoint errors every command
shares): one line naming the file (or option) and the problem, exit status 2, no traceback, inputs
untouched; `--debug` / CROPFORMER_DEBUG=1 show the traceback."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cropformer.checkpoint import save_training_checkpoint, save_weights
from cropformer.cli import run
from cropformer.cli.convert import main as convert_main
from cropformer.cli.train import main as train_main
from cropformer.config import load_config, to_dict
from cropformer.data.synthetic import make_synthetic_dataset
from cropformer.modeling.build import build_model
from tests.conftest import REPO, tiny_train_overrides


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Synthetic training data and one file of each kind a user may pass by mistake."""
    root = tmp_path_factory.mktemp("inputs")
    make_synthetic_dataset(root / "train", 4, (96, 128), seed=0)
    cfg = load_config("tiny")
    torch.manual_seed(0)
    state = build_model(cfg.model).state_dict()
    save_weights(state, root / "weights.safetensors", cfg)
    save_weights(state, root / "weights.pth", cfg)
    corrupt = bytearray((root / "weights.pth").read_bytes())
    corrupt[len(corrupt) // 2: len(corrupt) // 2 + 16] = bytes(16)
    (root / "corrupt.pth").write_bytes(bytes(corrupt))
    (root / "truncated.safetensors").write_bytes((root / "weights.safetensors").read_bytes()[:5000])
    (root / "photo.pth").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300))
    (root / "photo.json").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300))
    (root / "empty.pth").write_bytes(b"")
    (root / "bad.json").write_text('{"solver": {"max_iter": 10}\n "seed": 1}\n')
    (root / "notes.json").write_text("max_iter = 10\n")
    (root / "a_file").write_text("I am a file")
    (root / "ann_broken.json").write_text('{"images": [}')
    other = load_config("tiny", ["model.decoder.num_queries=7"])
    save_training_checkpoint(root / "other_model.pth", {"model": {}, "optimizer": {}, "scheduler": {}, "iteration": 1,
                                                         "rng": [], "world_size": 1, "config": to_dict(other)})
    return root


def _digests(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


def _train_args(files: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--cfg", "tiny", "--device", "cpu", "--set", *tiny_train_overrides(files, tmp_path / "out", "solver.max_iter=1"), *extra]


# (case, argv builder, strings the message must contain)
TRAIN_CASES = [
    ("unknown config name", lambda f, t: ["--cfg", "no_such_config"], ["'no_such_config' not found", "tiny.json"]),
    ("config not JSON", lambda f, t: ["--cfg", str(f / "bad.json")], ["bad.json:2:2: invalid JSON", "delimiter"]),
    ("config in another syntax", lambda f, t: ["--cfg", str(f / "notes.json")], ["notes.json:1:1: invalid JSON"]),
    ("unknown --set key", lambda f, t: ["--cfg", "tiny", "--set", "solver.maxiter=3"], ["--set", "'solver.maxiter'"]),
    ("--set without =", lambda f, t: ["--cfg", "tiny", "--set", "solver.max_iter"], ["expected key=value"]),
    ("--set wrong type", lambda f, t: ["--cfg", "tiny", "--set", "solver.max_iter=many"], ["solver.max_iter", "expected an integer"]),
    ("no training data", lambda f, t: ["--cfg", "tiny"], ["no training data", "--set data.train_json="]),
    ("missing train_json", lambda f, t: ["--cfg", "tiny", "--set", f"data.train_json={t / 'nope.json'}", f"data.train_images={f}"],
     ["data.train_json", "nope.json does not exist"]),
    ("missing val_images", lambda f, t: _train_args(f, t, "--set", f"data.val_images={t / 'no_images'}"),
     ["data.val_images", "no_images does not exist"]),
    ("train_json not JSON", lambda f, t: _train_args(f, t, "--set", f"data.train_json={f / 'ann_broken.json'}"),
     ["ann_broken.json:1:13: invalid JSON"]),
    ("train_json a photo", lambda f, t: _train_args(f, t, "--set", f"data.train_json={f / 'photo.json'}"),
     ["photo.json: not a JSON file"]),
    ("config a photo", lambda f, t: ["--cfg", str(f / "photo.json")], ["photo.json: not a JSON config"]),
    ("missing --resume", lambda f, t: _train_args(f, t, "--resume", str(t / "last.pth")), ["--resume", "last.pth: no such file"]),
    ("missing --init", lambda f, t: _train_args(f, t, "--init", str(t / "w.pth")), ["--init", "w.pth: no such file"]),
    ("corrupt --resume", lambda f, t: _train_args(f, t, "--resume", str(f / "corrupt.pth")), ["corrupt.pth: corrupt"]),
    ("weights as --resume", lambda f, t: _train_args(f, t, "--resume", str(f / "weights.safetensors")),
     ["weights.safetensors: not a training checkpoint", "--init"]),
    ("--resume of another model", lambda f, t: _train_args(f, t, "--resume", str(f / "other_model.pth")),
     ["other_model.pth: its model config differs"]),
    ("truncated --init", lambda f, t: _train_args(f, t, "--init", str(f / "truncated.safetensors")),
     ["truncated.safetensors: truncated"]),
    ("photo as --init", lambda f, t: _train_args(f, t, "--init", str(f / "photo.pth")), ["photo.pth: not a loadable weights pickle"]),
    ("empty --init", lambda f, t: _train_args(f, t, "--init", str(f / "empty.pth")), ["empty.pth: empty file"]),
    ("output_dir is a file", lambda f, t: _train_args(f, t, "--set", f"output_dir={f / 'a_file'}"),
     ["a_file: exists and is not a folder"]),
]


@pytest.mark.parametrize("case,argv,needles", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_user_errors(files, tmp_path, capsys, case, argv, needles):
    before = _digests(files)
    rc = run(train_main, argv(files, tmp_path))
    _one_line_error(capsys, rc, *needles)
    assert _digests(files) == before, "an input file was modified"


def test_train_cuda_without_a_gpu(files, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    args = _train_args(files, tmp_path)
    args[args.index("--device") + 1] = "cuda"
    _one_line_error(capsys, run(train_main, args), "--device cuda", "--device cpu")


def test_bad_options_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        run(train_main, ["--cfg", "tiny", "--no-such-option"])
    assert info.value.code == 2 and "unrecognized arguments: --no-such-option" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        run(convert_main, ["a.pth", "b.onnx"])
    assert info.value.code == 2 and "DST must end in .safetensors or .pth" in capsys.readouterr().err


CONVERT_CASES = [
    ("missing source", lambda f, t: [str(t / "nope.pth"), str(t / "o.safetensors")], ["nope.pth: no such file"]),
    ("corrupt source", lambda f, t: [str(f / "corrupt.pth"), str(t / "o.safetensors")], ["corrupt.pth: corrupt"]),
    ("truncated source", lambda f, t: [str(f / "truncated.safetensors"), str(t / "o.pth")], ["truncated.safetensors: truncated"]),
    ("photo as source", lambda f, t: [str(f / "photo.pth"), str(t / "o.pth")], ["photo.pth: not a loadable weights pickle"]),
    ("source as destination", lambda f, t: [str(f / "weights.pth"), str(f / "weights.pth")], ["would write over the source"]),
    ("config not JSON", lambda f, t: [str(f / "weights.pth"), str(t / "o.pth"), "--cfg", str(f / "bad.json")], ["bad.json:2:2"]),
]


@pytest.mark.parametrize("case,argv,needles", CONVERT_CASES, ids=[c[0] for c in CONVERT_CASES])
def test_convert_user_errors(files, tmp_path, capsys, case, argv, needles):
    before = _digests(files)
    _one_line_error(capsys, run(convert_main, argv(files, tmp_path)), *needles)
    assert _digests(files) == before, "an input file was modified"
    assert not any(tmp_path.iterdir()), "an output was left behind"


def test_debug_shows_the_traceback(files, tmp_path, monkeypatch):
    from cropformer.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="corrupt"):
        run(convert_main, [str(files / "corrupt.pth"), str(tmp_path / "o.pth"), "--debug"])
    monkeypatch.setenv("CROPFORMER_DEBUG", "1")
    with pytest.raises(CheckpointError, match="no such file"):
        run(convert_main, [str(tmp_path / "nope.pth"), str(tmp_path / "o.pth")])


def test_a_bug_keeps_its_traceback(capsys):
    """Only input errors become one line; a JSONDecodeError that escaped (a file read without naming it)
    is a bug to fix where the file is read, not a message to print."""
    import json

    def buggy(argv):
        json.loads("{")

    with pytest.raises(json.JSONDecodeError):
        run(buggy, [])


def test_scripts_and_other_commands_share_the_error_layer(files, tmp_path):
    """Through the real entry points: train.py, and `cropformer infer` with a damaged checkpoint."""
    res = subprocess.run([sys.executable, "train.py", "--cfg", "tiny", "--resume", str(tmp_path / "gone.pth"),
                          "--set", f"data.train_json={files / 'train' / 'annotations.json'}", f"data.train_images={files}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == f"error: --resume {tmp_path / 'gone.pth'}: no such file"
    assert "Traceback" not in res.stderr
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(next((files / "train" / "images").glob("*")).read_bytes())
    res = subprocess.run([sys.executable, "-m", "cropformer", "infer", "--ckpt", str(files / "corrupt.pth"), "--input",
                          str(tmp_path / "photos"), "--out", str(tmp_path / "seg")], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: {files / 'corrupt.pth'}: corrupt"), res.stderr[-2000:]
    assert "Traceback" not in res.stderr


BF16_CPUS = {  # name: (CPU flags, measured (fp32, bf16) matmul GFLOP/s, strings of the message)
    "no bf16 instructions": ({"fpu", "avx2", "avx512f"}, (130.0, 40.0), ("AVX512-BF16", "emulated")),
    "bf16 but no gain": ({"avx512f", "avx512_bf16"}, (258.0, 144.0), ("144 GFLOP/s against 258", "no gain")),
}


@pytest.mark.parametrize("cpu", list(BF16_CPUS))
@pytest.mark.parametrize("command", ["infer", "eval"])
def test_bf16_without_a_gain_is_one_line(files, tmp_path, capsys, monkeypatch, command, cpu):
    """--precision bf16 where it would not be faster (no bf16 instructions: emulated; or the instructions
    but bf16 matmuls measured no faster than fp32, as on this project's CI VM): refused in one line,
    before any output is written."""
    import cropformer.inference as inference
    from cropformer.cli import eval as eval_cli
    from cropformer.cli import infer as infer_cli

    flags, rates, needles = BF16_CPUS[cpu]
    monkeypatch.setattr(inference, "_cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(inference, "_cpu_bf16_gain", lambda: rates)
    images = files / "train" / "images"
    if command == "infer":
        main, argv = infer_cli.main, ["--input", str(images), "--out", str(tmp_path / "out")]
    else:
        main, argv = eval_cli.main, ["--data", str(files / "train" / "annotations.json"), "--images", str(images),
                                     "--out", str(tmp_path / "out")]
    rc = run(main, ["--ckpt", str(files / "weights.safetensors"), "--device", "cpu", "--precision", "bf16", *argv])
    _one_line_error(capsys, rc, "bf16", "fp32", *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("load,stat,env,expected", [
    (0.2, 1.5, {}, "PASSIVE"),  # others busy now, a quiet minute before: /proc/stat decides
    (5.0, 0.1, {}, "unset"),  # a stale load average from a job that just ended: not busy
    (5.0, None, {}, "PASSIVE"), (0.2, None, {}, "unset"),  # no /proc/stat: the load average decides
    (5.0, 1.5, {"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
    (5.0, 1.5, {"GOMP_SPINCOUNT": "1000"}, "unset")])
def test_openmp_waits_passively_only_on_a_busy_cpu(load, stat, env, expected):
    """The command-line tools choose passive OpenMP waiting before torch loads when others use the CPU
    now (it cost 17-38% idle, gained 1.8x beside a busy process), never over the user's choice."""
    probe = ("import os, sys\nos.getloadavg = lambda: (%r, 0.0, 0.0)\nos.sched_getaffinity = lambda pid: {0, 1}\n"
             "import cropformer.cli as cli\ncli.others_cpu_use = lambda cpus: %r\ncli.configure_cpu_runtime()\n"
             "assert 'torch' not in sys.modules\nprint(os.environ.get('OMP_WAIT_POLICY', 'unset'))") % (load, stat)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    res = subprocess.run([sys.executable, "-c", probe], env={**base, **env}, cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == expected
    assert ("OMP_WAIT_POLICY=PASSIVE" in res.stderr) == (expected == "PASSIVE" and not env)


def test_others_cpu_use_reads_the_allowed_cpus(tmp_path, monkeypatch):
    """Ticks of the CPUs this process may use only; busy = all but idle and iowait (steal counts)."""
    import cropformer.cli as cli

    stat = tmp_path / "stat"
    first = "cpu  10 0 5 400 5 0 0 0 0 0\ncpu0 10 0 5 100 5 0 0 0 0 0\ncpu1 0 0 0 200 0 0 0 0 0 0\ncpu2 0 0 0 100 0 0 0 0 0 0\n"
    # cpu0: 70 of 80 ticks busy (20 of them stolen), cpu1: 10 of 80, cpu2 (not ours): 80 of 80
    second = ("cpu  140 0 15 480 5 0 0 20 0 0\ncpu0 50 0 15 110 5 0 0 20 0 0\ncpu1 10 0 0 270 0 0 0 0 0 0\n"
              "cpu2 80 0 0 100 0 0 0 0 0 0\nintr 1 2 3\nctxt 5\n")
    stat.write_text(first)
    monkeypatch.setattr(cli.time, "sleep", lambda s: stat.write_text(second))
    assert cli.others_cpu_use({0, 1}, stat_path=str(stat)) == pytest.approx((70 + 10) / 160 * 2)
    assert cli.others_cpu_use({0}, stat_path=str(tmp_path / "missing")) is None


@pytest.mark.skipif(not os.path.exists("/proc/stat") or not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_others_cpu_use_sees_a_busy_process():
    from cropformer.cli import others_cpu_use

    cpus = os.sched_getaffinity(0)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        used = others_cpu_use(cpus, window_s=0.5)
    finally:
        hog.kill()
        hog.wait()
    assert used is not None and used >= 0.6, f"one busy-looping process measured as {used} cores"
