"""`cropformer export`: the exported program (and AOTInductor package) loads in a fresh process that cannot
import cropformer and reproduces the eager network; the command refuses what it must refuse."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from cropformer.checkpoint import save_weights
from cropformer.cli import run
from cropformer.cli.export import main as export_main
from cropformer.config import load_config
from cropformer.export import MODES, check_export, export_model
from cropformer.modeling.build import build_model
from cropformer.ops._dispatch import compiled_extension

pytestmark = pytest.mark.skipif(compiled_extension() is None,
                                reason="export needs the compiled extension cropformer._C (not built here)")

# fp32, the same kernels; the exported graph only reorders a few reductions
RTOL = 1e-4


def _tiny_model():
    torch.manual_seed(0)
    cfg = load_config("tiny")
    return cfg, build_model(cfg.model).eval()


def _assert_reproduces(report: dict) -> None:
    # outputs of the eager model are O(1..10) logits; the bound is relative to 1 at least
    assert all(d <= RTOL * 10 for d in report["max_abs_diff"]), report


@pytest.fixture
def tiny_ckpt(tmp_path):
    cfg, model = _tiny_model()
    path = tmp_path / "tiny.safetensors"
    save_weights(model.state_dict(), path, cfg=cfg)
    return path


def test_export_single_view_fresh_process(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """The command end to end (static, image decoder, a relative --out): files, metadata, and the
    fresh-process check that it prints (cropformer unimportable there)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "exported"
    rc = export_main(["--ckpt", str(tiny_ckpt), "--out", "exported", "--mode", "single", "--size", "64", "96",
                      "--static"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["cropformer_ops.so", "export.json", "program.pt2"]
    meta = json.loads((out / "export.json").read_text())
    assert (meta["mode"], meta["views"], meta["decoder"], meta["dynamic"]) == ("single", 1, "image", False)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    check = [r for r in lines if r.get("check") == "program"]
    assert len(check) == 1, lines
    assert check[0]["shapes"] == [[1, 12, 2], [1, 12, 16, 24]]  # Q = 12 queries, H/4 x W/4 masks
    _assert_reproduces(check[0])
    # No Python custom op of ours remains (loading would need our code); deformable attention is the
    # compiled kernel of cropformer_ops.so.
    program = torch.export.load(str(out / "program.pt2"))
    ours = sorted({str(n.target) for n in program.graph.nodes if "cropformer" in str(n.target)})
    assert ours == ["cropformer_C.ms_deform_attn_forward.default"], ours


def test_export_refuses_existing_out_and_bad_size(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert run(export_main, ["--ckpt", str(tiny_ckpt), "--out", str(out), "--mode", "single"]) == 2
    assert "exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    assert run(export_main, ["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "new"), "--size", "70", "96"]) == 2
    assert "multiples of 32" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_export_onnx_without_its_packages(tiny_ckpt, tmp_path, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec  # pretend onnxscript is not installed, wherever it is
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real_find_spec(name, *a))
    assert run(export_main, ["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "x"), "--onnx"]) == 2
    assert "pip install onnx onnxscript" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_export_mode_needs_cropformer(tmp_path, capsys):
    cfg = load_config("tiny", ["model.meta_architecture=mask2former"])
    torch.manual_seed(0)
    path = tmp_path / "m2f.safetensors"
    save_weights(build_model(cfg.model).state_dict(), path, cfg=cfg)
    assert run(export_main, ["--ckpt", str(path), "--out", str(tmp_path / "x"), "--mode", "full_crops"]) == 2
    assert "Mask2Former" in capsys.readouterr().err


@pytest.mark.slow
def test_export_full_crops_dynamic_and_aoti(tmp_path):
    """Full image + 4 crops through the batch decoder, any batch size, as a program and an AOTInductor
    package, both checked in a fresh process on a batch size other than the traced one."""
    cfg, model = _tiny_model()
    out = tmp_path / "full_crops"
    meta = export_model(model, cfg, out, mode="full_crops", height=64, width=96, dynamic=True, aoti=True)
    assert meta["views"] == MODES["full_crops"][0] == 5 and meta["aoti"] == {"cpu": "model_cpu.pt2"}
    for kind in ("program", "cpu"):
        report = check_export(out, model, kind=kind, height=64, width=96, batch=3)  # traced with 2
        assert report["shapes"] == [[3, 12, 2], [3, 12, 5, 16, 24]], report
        _assert_reproduces(report)


def test_export_onnx_runs_in_onnxruntime(tiny_ckpt, tmp_path, capsys):
    """--onnx: deformable attention translated to ONNX ops; the model runs in onnxruntime in a fresh
    process (no torch custom op, no library) and reproduces the eager network. onnx, onnxscript and
    onnxruntime are optional: not part of the install."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)
    out = tmp_path / "onnx"
    assert export_main(["--ckpt", str(tiny_ckpt), "--out", str(out), "--mode", "full_crops", "--size", "64", "96",
                        "--onnx"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    check = [r for r in lines if r.get("check") == "onnx"]
    assert len(check) == 1, lines
    assert check[0]["shapes"] == [[1, 12, 2], [1, 12, 5, 16, 24]]
    _assert_reproduces(check[0])
