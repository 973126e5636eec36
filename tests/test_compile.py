"""torch.compile of the whole CropFormer forward (fullgraph: no graph break anywhere) and of a training step
(forward + criterion + backward), against eager, on the tiny config with the ops `auto` picks (the compiled
C++ kernels on CPU).

The default run compiles with backend "aot_eager": dynamo must trace the whole network into one graph
and AOTAutograd must trace forward and backward through every op's fake implementation and registered
autograd, which is where compile-friendliness breaks; Inductor's code generation (minutes on 2 CPU
cores) is checked by the `slow` tests.
"""
from __future__ import annotations

import pytest
import torch

from cropformer.config import load_config
from cropformer.losses import PointSampler, build_criterion
from cropformer.modeling.build import build_model

# Outputs and gradients of the compiled model against eager: fp32 with reordered reductions (Inductor
# fuses and reorders), relative to the largest magnitude of the tensor.
RTOL = 1e-4


def _tiny(train: bool):
    torch.manual_seed(0)
    cfg = load_config("tiny")
    model = build_model(cfg.model)
    return cfg, (model.train() if train else model.eval())


def _inputs(B: int = 1, T: int = 2, H: int = 64, W: int = 96):
    # 64 x 96: the smallest size whose stride-32 level is 2 x 3 (odd); the second view is cropped
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (B, T, 3, H, W), generator=g, dtype=torch.uint8)
    sizes = torch.tensor([[H, W], [H - 13, W - 21]]).repeat(B, 1, 1)
    return images, sizes


def _assert_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = max(1.0, expected.abs().max().item())
    err = (got - expected).abs().max().item()
    assert err <= RTOL * scale, f"{what}: compiled differs from eager by {err:.3g} (scale {scale:.3g})"


def _flat_outputs(out: dict) -> dict[str, torch.Tensor]:
    flat = {}
    for level in ("image", "batch"):
        flat[f"{level}.pred_logits"] = out[level]["pred_logits"]
        flat[f"{level}.pred_masks"] = out[level]["pred_masks"]
        for i, aux in enumerate(out[level]["aux_outputs"]):
            flat[f"{level}.aux{i}.pred_masks"] = aux["pred_masks"]
    flat["association"] = out["association"]
    return flat


def _check_forward(backend: str) -> None:
    torch._dynamo.reset()
    _, model = _tiny(train=False)
    images, sizes = _inputs()
    with torch.no_grad():
        expected = _flat_outputs(model(images, sizes))
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        got = _flat_outputs(compiled(images, sizes))
    for name in expected:
        _assert_close(got[name], expected[name], name)


def test_compile_forward_fullgraph():
    _check_forward("aot_eager")


@pytest.mark.slow
def test_compile_forward_fullgraph_inductor():
    _check_forward("inductor")


def _targets(B: int, T: int, H: int, W: int):
    g = torch.Generator().manual_seed(2)
    targets = []
    for n in (3, 2)[:B]:
        masks = torch.nn.functional.interpolate(torch.rand(n, T, H // 8, W // 8, generator=g), size=(H, W)) > 0.5
        targets.append({"labels": torch.zeros(n, dtype=torch.int64), "masks": masks,
                        "valid": torch.ones(n, T, dtype=torch.bool)})
    return targets


def _train_step(model, criterion, images, sizes, targets):
    """forward + criterion + backward; the same point draws for every call (seeded sampler)."""
    losses = criterion(model(images, sizes), targets, PointSampler(torch.Generator().manual_seed(3)))
    total = sum(losses.values())
    total.backward()
    return losses


def _check_train_step(backend: str) -> None:
    torch._dynamo.reset()
    cfg, model = _tiny(train=True)
    criterion = build_criterion(cfg)
    images, sizes = _inputs(B=2)
    targets = _targets(2, 2, 64, 96)

    expected = _train_step(model, criterion, images, sizes, targets)
    expected_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    # The network as one graph; the criterion compiled as far as it goes: Hungarian matching (scipy on the
    # host) is a graph break by nature.
    compiled_model = torch.compile(model, fullgraph=True, backend=backend)
    compiled_criterion = torch.compile(criterion, backend=backend)
    got = _train_step(compiled_model, compiled_criterion, images, sizes, targets)

    assert got.keys() == expected.keys()
    for name in expected:
        _assert_close(got[name].detach(), expected[name].detach(), name)
    assert len(expected_grads) > 100  # every parameter of the network, none skipped
    for name, grad in expected_grads.items():
        p = dict(model.named_parameters())[name]
        assert p.grad is not None, f"{name}: no gradient through the compiled step"
        _assert_close(p.grad, grad, f"grad {name}")


def test_compile_train_step():
    _check_train_step("aot_eager")


@pytest.mark.slow
def test_compile_train_step_inductor():
    _check_train_step("inductor")
