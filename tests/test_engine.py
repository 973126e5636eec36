"""Training loop: exact resume, crash-safe checkpoints, NaN stop, 2-process DDP, optimiser/schedule rules."""
from __future__ import annotations

import copy

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cropformer.checkpoint import load_training_checkpoint, save_training_checkpoint
from cropformer.config import load_config
from cropformer.data.synthetic import make_synthetic_dataset
from cropformer.engine import NonFiniteLossError, train
from cropformer.modeling.build import build_model
from cropformer.progress import Progress
from cropformer.solver import build_optimizer, lr_factor, param_groups
from tests.conftest import tiny_train_overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    make_synthetic_dataset(root / "train", 6, (96, 128), seed=0)
    return root


def tiny_cfg(data: Path, out: Path, *extra: str):
    return load_config("tiny", tiny_train_overrides(data, out, *extra))


def _state(path):
    ckpt = load_training_checkpoint(path)
    return ckpt["model"], ckpt["optimizer"]["state"], ckpt["iteration"]


def test_resume_is_exact(tiny_data, tmp_path):
    straight = train(tiny_cfg(tiny_data, tmp_path / "a"), device="cpu")
    assert straight["iterations"] == 4
    half = train(tiny_cfg(tiny_data, tmp_path / "b"), device="cpu", stop_after=2)
    assert half["iterations"] == 2 and "weights" not in half
    resumed = train(tiny_cfg(tiny_data, tmp_path / "b"), device="cpu", resume=half["last_checkpoint"])
    ma, oa, ia = _state(straight["last_checkpoint"])
    mb, ob, ib = _state(resumed["last_checkpoint"])
    assert ia == ib == 4
    for k in ma:
        assert torch.equal(ma[k], mb[k]), f"parameter {k} differs after resume"
    for pid in oa:
        for k in oa[pid]:
            assert torch.equal(oa[pid][k], ob[pid][k]), f"optimiser state {pid}.{k} differs after resume"
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [1, 2, 3, 4]
    assert (tmp_path / "b" / "loss_curve.png").stat().st_size > 0
    assert (tmp_path / "b" / "model_final.safetensors").exists()


_KILL_CHILD = r"""
import sys, time, torch
from cropformer import checkpoint
real_save = torch.save
def slow_save(obj, f):
    with open(f, "wb") as fh:
        fh.write(b"partial checkpoint bytes")
        fh.flush()
        print("WRITING", flush=True)
        time.sleep(60)
checkpoint.torch.save = slow_save
checkpoint.save_training_checkpoint(sys.argv[1], {"iteration": 2, "model": {"w": torch.zeros(3)}, "optimizer": {},
                                                  "scheduler": {}, "rng": []})
"""


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    path = tmp_path / "last_checkpoint.pth"
    save_training_checkpoint(path, {"iteration": 1, "model": {"w": torch.ones(3)}, "optimizer": {}, "scheduler": {}, "rng": []})
    proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(path)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "WRITING"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = load_training_checkpoint(path)
    assert ckpt["iteration"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))


def test_nonfinite_loss_stops_and_names_term(tiny_data, tmp_path, monkeypatch):
    from cropformer import engine

    real = engine.build_criterion

    def poisoned(cfg):
        crit = real(cfg)
        original = crit.forward

        def forward(outputs, targets, sampler=None):
            losses = original(outputs, targets, sampler)
            if engine_iter["n"] >= 2:
                losses["loss_dice_3d"] = losses["loss_dice_3d"] * float("nan")
            engine_iter["n"] += 1
            return losses

        crit.forward = forward
        return crit

    engine_iter = {"n": 0}
    monkeypatch.setattr(engine, "build_criterion", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"iteration 3: term\(s\) loss_dice_3d; last good checkpoint: .*last_checkpoint.pth"):
        train(tiny_cfg(tiny_data, tmp_path / "nan"), device="cpu")
    assert load_training_checkpoint(tmp_path / "nan" / "last_checkpoint.pth")["iteration"] == 2


def test_two_process_gloo_ranks_stay_identical(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    script = tmp_path / "ddp_worker.py"
    script.write_text(
        "import json, sys, torch, torch.distributed as dist\n"
        "from cropformer.config import load_config\n"
        "from cropformer import engine\n"
        "captured = {}\n"
        "real = engine.build_model\n"
        "def keep(cfg):\n"
        "    captured['m'] = real(cfg)\n"
        "    return captured['m']\n"
        "engine.build_model = keep\n"
        "cfg = load_config('tiny', sys.argv[1:])\n"
        "engine.train(cfg, device='cpu')\n"
        "flat = torch.cat([p.detach().flatten() for p in captured['m'].parameters()])\n"
        "out = [None] * dist.get_world_size()\n"
        "dist.all_gather_object(out, flat)\n"
        "if dist.get_rank() == 0:\n"
        "    json.dump({'max_diff': max(float((o - out[0]).abs().max()) for o in out), 'n': len(out)},\n"
        "              open(cfg.output_dir + '/ddp_check.json', 'w'))\n"
    )
    cfg_args = [
        f"data.train_json=\"{tiny_data / 'train' / 'annotations.json'}\"",
        f"data.train_images=\"{tiny_data / 'train' / 'images'}\"",
        "input.min_size_train=[64,96]", "loss.num_points=256", "solver.ims_per_batch=2",
        "solver.max_iter=2", "solver.checkpoint_period=2", "data.num_workers=0", f"output_dir=\"{out}\"",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), *cfg_args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-12000:]
    check = json.loads((out / "ddp_check.json").read_text())
    assert check["n"] == 2 and check["max_diff"] == 0.0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2]


def test_param_groups_follow_the_original_rules():
    cfg = load_config("tiny")
    model = build_model(cfg.model)
    groups = param_groups(model, cfg.solver)
    by_param = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(by_param) == len(names)  # every parameter exactly once
    base, wd = cfg.solver.base_lr, cfg.solver.weight_decay
    assert by_param[id(names["image_encoder.patch_embed.proj.weight"])]["lr"] == pytest.approx(base * 0.1)
    assert by_param[id(names["image_encoder.layers.0.blocks.0.attn.relative_position_bias_table"])]["weight_decay"] == 0
    assert by_param[id(names["image_encoder.layers.0.blocks.0.norm1.weight"])]["weight_decay"] == 0
    assert by_param[id(names["image_decoder.query_feat.weight"])]["weight_decay"] == 0
    assert by_param[id(names["image_decoder.level_embed.weight"])]["weight_decay"] == 0
    assert by_param[id(names["pixel_decoder.transformer.level_embed"])]["weight_decay"] == wd  # plain Parameter
    assert by_param[id(names["image_decoder.transformer_ffn_layers.0.linear1.weight"])] == by_param[id(names["association.ffn_layers.0.linear1.weight"])]
    assert by_param[id(names["pixel_decoder.adapter_1.norm.weight"])]["weight_decay"] == 0
    assert isinstance(build_optimizer(model, cfg.solver), torch.optim.AdamW)



def test_optimizer_is_fused_adamw_with_adamws_update():
    """build_optimizer's fused AdamW takes the steps of torch's reference loop (foreach=False) on the same
    groups, and resumes from a state saved by that loop (checkpoints from before the fused optimizer)."""
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    reference = copy.deepcopy(model)
    opt = build_optimizer(model, cfg.solver)
    assert all(g["fused"] for g in opt.param_groups)
    ref_opt = torch.optim.AdamW(param_groups(reference, cfg.solver), lr=cfg.solver.base_lr,
                                weight_decay=cfg.solver.weight_decay, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q in zip(model.parameters(), reference.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    continued = copy.deepcopy(reference)
    resumed = build_optimizer(continued, cfg.solver)
    resumed.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # as read from a file: no shared tensors
    for p, q in zip(reference.parameters(), continued.parameters()):
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()
    ref_opt.step()
    resumed.step()
    for (name, p), q in zip(reference.named_parameters(), continued.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7, msg=name)

def test_lr_schedules():
    cfg = load_config("cropformer_swin_tiny_3x").solver
    assert lr_factor(0, cfg) == 1.0
    assert lr_factor(17187, cfg) == pytest.approx((1 - 17187 / 34375) ** 0.9)
    step = load_config("swin_t_1x").solver
    assert lr_factor(30524, step) == 1.0 and lr_factor(30525, step) == pytest.approx(0.1)
    assert lr_factor(33138, step) == pytest.approx(0.01)


def test_progress_rate_and_eta_follow_the_recent_speed():
    """Issue 15: on a machine that gets busy (or frees up), the rate and ETA say so within a few dozen
    iterations; the average since the start would still be far off."""
    now = [0.0]
    stream = io.StringIO()
    bar = Progress(300, "train", stream=stream, every_s=0.0, clock=lambda: now[0])

    def run(n: int, seconds_each: float) -> None:
        for _ in range(n):
            now[0] += seconds_each
            bar.update(1)

    run(50, 1.0)
    assert bar.rate == pytest.approx(1.0)
    run(50, 10.0)  # other jobs take the cores
    assert bar.rate == pytest.approx(0.1, rel=0.1) and 100 / now[0] > 0.18  # since the start: 0.18 it/s
    assert bar.eta == pytest.approx(200 / 0.1, rel=0.1)
    assert "0.10 it/s" in stream.getvalue().splitlines()[-1]
    run(50, 1.0)  # and leave again
    assert bar.rate == pytest.approx(1.0, rel=0.1) and 150 / now[0] == 0.25  # since the start: 0.25 it/s
    assert bar.eta == pytest.approx(150, rel=0.1)
