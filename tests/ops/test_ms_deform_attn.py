"""Multi-scale deformable attention: the torch reference against a naive loop, the C++ CPU kernel and the
Triton kernels (CPU under TRITON_INTERPRET=1, compiled on a GPU) and the CUDA kernel (GPU) against the
float64 reference in the forward and all three gradients, gradcheck, the dispatch, the custom op under
torch.compile, and input validation.

The C++ tests need the compiled op: build the extension, or run with
``CROPFORMER_JIT_OPS=ms_deform_attn python -m pytest tests/ops/test_ms_deform_attn.py``.
The compiled-Triton GPU tests need the interpreter off, which this module turns on unless told otherwise:
``TRITON_INTERPRET=0 CROPFORMER_JIT_OPS=ms_deform_attn CROPFORMER_JIT_CUDA=1 python -m pytest
tests/ops/test_ms_deform_attn.py -m gpu``.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels/ (and so triton.jit) is imported

import importlib  # noqa: E402
import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from cropformer.ops import _dispatch  # noqa: E402
from cropformer.ops._dispatch import has_compiled_op, has_cuda_kernels, triton_interpret  # noqa: E402
from cropformer.ops.ms_deform_attn import ms_deform_attn, ms_deform_attn_ref  # noqa: E402
from tests.conftest import assert_close, cuda_or_skip, nan_filled_empty, spy_device_guard, triton_device_or_skip  # noqa: E402

# the module (cropformer.ops.ms_deform_attn, the attribute, is the function of the same name)
msda = importlib.import_module("cropformer.ops.ms_deform_attn")

# (B, spatial_shapes, H, D, Q, P). Level sizes are odd or non-square next to powers of two (only those
# give pixel coordinates that are exact in binary, where the border / pixel-centre points are placed);
# 1x1 levels; 1 to 4 levels; D = 1, 5, 33 (not powers of two; 33 also takes the CUDA kernel's second
# 32-lane pass), and 32 / 64 (the C++ kernel's compile-time-D paths); batch 1 and > 1.
CASES = {
    "tiny": (1, [[1, 1]], 1, 1, 1, 1),
    "odd3": (2, [[5, 7], [3, 2], [1, 1]], 3, 5, 11, 3),
    "four": (1, [[4, 8], [2, 2], [7, 3], [1, 1]], 2, 33, 13, 4),
    "d32": (3, [[6, 6], [3, 3]], 8, 32, 9, 2),
    "d64": (2, [[8, 8], [4, 4]], 2, 64, 7, 1),
}
CASE_IDS = list(CASES)
# Forward / gradient tolerances per input dtype (against the float64 reference on the same rounded
# inputs). fp32: ~L*P*4*D fp32 products per output; grad_loc carries a factor of the level size, so
# its absolute tolerance scales with the largest |expected| value.
TOL = {torch.float32: 1e-5, torch.float64: 1e-11}


def make_inputs(B, shapes, H, D, Q, P, seed=0):
    """float64 (value, spatial_shapes, level_start_index, sampling_locations, attention_weights).

    Locations are uniform in [-0.1, 1.1] (some outside every level), and 20% of the coordinates are
    replaced by special points in pixel coordinates x = loc * size - 0.5: the map's borders (loc = 0, 1),
    half a pixel and far outside; on power-of-two sides (exact in binary) also pixel centres, the
    first / last pixel and exactly one pixel outside (x = -1, x = size), where the bilinear kinks are.
    15% of the attention weights are exactly zero.
    """
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    L = len(shapes)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S = int(sizes.sum())
    value = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    loc = torch.rand(B, Q, H, L, P, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1
    for lvl, (h, w) in enumerate(shapes):
        for axis, size in ((0, w), (1, h)):
            xs = [-0.5, size - 0.5, -1.5, size + 0.5, -40.0, size + 40.0]
            if size & (size - 1) == 0:
                xs += [-1.0, 0.0, size - 1.0, float(size), float(size // 2)]
            cands = (torch.tensor(xs, dtype=torch.float64) + 0.5) / size
            pick = torch.rand(B, Q, H, P, generator=g) < 0.2
            idx = torch.randint(len(xs), (B, Q, H, P), generator=g)
            loc[:, :, :, lvl, :, axis] = torch.where(pick, cands[idx], loc[:, :, :, lvl, :, axis])
    attn = torch.rand(B, Q, H, L, P, generator=g, dtype=torch.float64)
    attn[torch.rand(attn.shape, generator=g) < 0.15] = 0.0
    return value, spatial_shapes, level_start_index, loc, attn


def run(backend, inputs, grad_out, dtype, device="cpu"):
    """Output and (grad_value, grad_loc, grad_attn) of `backend` on `inputs` rounded to dtype."""
    value, shapes, starts, loc, attn = inputs
    leaves = [t.to(device, dtype).requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], shapes.to(device), starts.to(device), leaves[1], leaves[2], backend=backend)
    out.backward(grad_out.to(device, dtype))
    return out, [t.grad for t in leaves]


def reference(inputs, grad_out, dtype):
    """The float64 reference on the same inputs rounded to dtype (so both see identical numbers)."""
    value, shapes, starts, loc, attn = inputs
    leaves = [t.to(dtype).double().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn_ref(leaves[0], shapes, starts, leaves[1], leaves[2])
    out.backward(grad_out.to(dtype).double())
    return out, [t.grad for t in leaves]


def check_parity(backend, case, dtype, device="cpu", seed=0):
    B, shapes, H, D, Q, P = CASES[case]
    inputs = make_inputs(B, shapes, H, D, Q, P, seed=seed)
    grad_out = torch.randn(B, Q, H * D, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    with nan_filled_empty():  # an output or gradient element a kernel forgets to write is NaN, not luck
        out, grads = run(backend, inputs, grad_out, dtype, device)
    ref_out, ref_grads = reference(inputs, grad_out, dtype)
    assert out.dtype == dtype and out.device.type == torch.device(device).type
    tol = TOL[dtype]
    assert_close(out, ref_out, rtol=tol, atol=tol, name=f"{backend} out")
    for name, got, exp in zip(("grad_value", "grad_loc", "grad_attn"), grads, ref_grads):
        assert got.dtype == dtype
        assert_close(got, exp, rtol=tol, atol=tol * max(1.0, exp.abs().max().item()), name=f"{backend} {name}")


def cpu_kernel_or_skip():
    if not has_compiled_op("ms_deform_attn_forward"):
        pytest.skip("C++ kernel not built (build the extension or set CROPFORMER_JIT_OPS=ms_deform_attn)")


def cuda_kernel_or_skip():
    dev = cuda_or_skip()
    if not (has_cuda_kernels() and has_compiled_op("ms_deform_attn_forward")):
        pytest.skip("CUDA kernel not built (build with CUDA or set CROPFORMER_JIT_OPS=ms_deform_attn "
                    "CROPFORMER_JIT_CUDA=1)")
    return dev


# ----------------------------------------------------------------------------------------------------
# The reference
# ----------------------------------------------------------------------------------------------------


def naive_msda(value, spatial_shapes, sampling_locations, attention_weights):
    """Loop-per-sample bilinear sampling written from the definition (x = loc * w - 0.5, zero outside)."""
    B, S, H, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    out = torch.zeros(B, Q, H, D, dtype=value.dtype)
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        level = value[:, start:start + h * w].view(B, h, w, H, D)
        for b in range(B):
            for q in range(Q):
                for hd in range(H):
                    for p in range(P):
                        x = sampling_locations[b, q, hd, lvl, p, 0].item() * w - 0.5
                        y = sampling_locations[b, q, hd, lvl, p, 1].item() * h - 0.5
                        x0, y0 = int(torch.tensor(x).floor()), int(torch.tensor(y).floor())
                        for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                            if 0 <= xi < w and 0 <= yi < h:
                                weight = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                out[b, q, hd] += attention_weights[b, q, hd, lvl, p] * weight * level[b, yi, xi, hd]
        start += h * w
    return out.view(B, Q, H * D)


@pytest.mark.parametrize("case", ["tiny", "odd3"])
def test_reference_matches_naive_loop(case):
    B, shapes, H, D, Q, P = CASES[case]
    value, shapes_t, starts, loc, attn = make_inputs(B, shapes, H, D, min(Q, 4), P, seed=3)
    assert_close(ms_deform_attn_ref(value, shapes_t, starts, loc, attn), naive_msda(value, shapes_t, loc, attn),
                 rtol=1e-12, atol=1e-12, name="reference vs naive")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_reference_low_precision_batch_of_one(dtype):
    """The reference in bf16/fp16 gives each sample of a batch what it gives that sample alone. With
    B = 1 its per-level reshape is a channels-last view, from which torch's CPU grid_sample in 16-bit
    read wrong values and NaN at a 20 x 32 level (torch 2.14.1; found when inference went view by view)."""
    value, shapes_t, starts, loc, attn = make_inputs(2, [[20, 32], [10, 16], [5, 8]], 4, 16, 57, 4, seed=11)
    value, loc, attn = (t.to(dtype) for t in (value, loc, attn))
    both = ms_deform_attn_ref(value, shapes_t, starts, loc, attn)
    for b in range(2):
        alone = ms_deform_attn_ref(value[b : b + 1], shapes_t, starts, loc[b : b + 1], attn[b : b + 1])
        assert torch.isfinite(alone).all()
        assert torch.equal(alone[0], both[b])


# ----------------------------------------------------------------------------------------------------
# C++ CPU kernel
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CASE_IDS)
def test_cpu_kernel_parity(case, dtype):
    cpu_kernel_or_skip()
    check_parity("cpu", case, dtype)


@pytest.mark.parametrize("threads", [4, 7])
@pytest.mark.parametrize("case", ["odd3", "d32"])
def test_cpu_kernel_query_chunks(case, threads):
    """Thread counts that B*H partitions cannot balance: the backward splits queries into chunks with
    private grad_value buffers (query_chunks in the .cpp: odd3, B*H = 6: 3 chunks with 4 threads, 5 with
    7; d32, B*H = 24: direct with 4 threads, 2 chunks with 7)."""
    cpu_kernel_or_skip()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_parity("cpu", case, torch.float32, seed=5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["odd3", "d32"])
def test_cpu_kernel_low_precision(case, dtype):
    """16-bit inputs, fp32 accumulation: the kernel's error against the float64 reference is at most a
    small multiple of what the torch reference itself loses running in that dtype."""
    cpu_kernel_or_skip()
    check_low_precision("cpu", case, dtype, "cpu")


def check_low_precision(backend, case, dtype, device):
    B, shapes, H, D, Q, P = CASES[case]
    inputs = make_inputs(B, shapes, H, D, Q, P, seed=7)
    grad_out = torch.randn(B, Q, H * D, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out, grads = run(backend, inputs, grad_out, dtype, device)
    torch_out, torch_grads = run("torch", inputs, grad_out, dtype, device)
    ref_out, ref_grads = reference(inputs, grad_out, dtype)
    for name, got, base, exp in zip(("out", "grad_value", "grad_loc", "grad_attn"), [out, *grads],
                                    [torch_out, *torch_grads], [ref_out, *ref_grads]):
        assert got.dtype == dtype
        assert_within_torch_error(f"{backend} {dtype} {name}", got, base, exp)


def assert_within_torch_error(name, got, torch_lowp, expected):
    """Practice 9: the error against float64 is at most twice what the torch reference loses in that dtype."""
    err = (got.double().cpu() - expected).abs().max().item()
    torch_err = (torch_lowp.double().cpu() - expected).abs().max().item()
    # The floor is half an ulp of the largest value: the one rounding of the kernel's fp32 result to the dtype,
    # which even an exact kernel cannot avoid (fp32 accumulation adds ~1e-6 relative). At the test sizes it is
    # 3-370x below 2 x torch's own error, so "twice PyTorch's error" is what binds.
    floor = 0.5 * torch.finfo(got.dtype).eps * expected.abs().max().item()
    print(f"{name}: max err {err:.3e}, torch: {torch_err:.3e}, floor {floor:.3e} "
          f"(2 x torch / floor = {2 * torch_err / max(floor, 1e-30):.1f})")
    assert err <= 2 * torch_err + floor, f"{name}: {err:.3e} vs torch's own {torch_err:.3e} (floor {floor:.3e})"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_bound_binds(dtype):
    """A result three times as far off as torch's own must fail: the old `2 * torch_err + 1e-2 * scale`
    let it through in fp16 (its floor was 5x torch's error there)."""
    inputs = make_inputs(*CASES["odd3"], seed=7)
    grad_out = torch.randn(2, 11, 15, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    torch_out, _ = run("torch", inputs, grad_out, dtype, "cpu")
    expected, _ = reference(inputs, grad_out, dtype)
    assert_within_torch_error("torch itself", torch_out, torch_out, expected)
    worse = (expected + 3 * (torch_out.double() - expected)).to(dtype)
    with pytest.raises(AssertionError, match="vs torch's own"):
        assert_within_torch_error("3 x torch's error", worse, torch_out, expected)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradcheck(backend):
    """float64 finite differences on a tiny problem (random locations, so none sits on a kink)."""
    fast_backend_or_skip(backend)
    g = torch.Generator().manual_seed(11)
    shapes = torch.tensor([[3, 4], [2, 1]])
    starts = torch.tensor([0, 12])
    value = torch.randn(2, 14, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    loc = (torch.rand(2, 3, 2, 2, 2, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1).requires_grad_()
    attn = torch.rand(2, 3, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(v, sl, aw):
        return ms_deform_attn(v, shapes, starts, sl, aw, backend=backend)

    # the interpreter is slow: fast mode checks random projections of the Jacobian instead of every column
    assert torch.autograd.gradcheck(fn, (value, loc, attn), eps=1e-6, atol=1e-6, fast_mode=backend == "triton")


# ----------------------------------------------------------------------------------------------------
# Triton (interpreter on CPU; compiled on a GPU)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CASE_IDS)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_triton_parity(device, case, dtype):
    triton_device_or_skip(device)
    check_parity("triton", case, dtype, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["odd3", "d32"])
def test_triton_low_precision_gpu(case, dtype):
    triton_device_or_skip("cuda")
    check_low_precision("triton", case, dtype, "cuda")


# ----------------------------------------------------------------------------------------------------
# CUDA kernel (GPU only)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CASE_IDS)
def test_cuda_kernel_parity(case, dtype):
    cuda_kernel_or_skip()
    check_parity("cuda", case, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["odd3", "four", "d32"])
def test_cuda_kernel_low_precision(case, dtype):
    cuda_kernel_or_skip()
    check_low_precision("cuda", case, dtype, "cuda")


@pytest.mark.gpu
def test_cuda_kernel_gradcheck():
    dev = cuda_kernel_or_skip()
    g = torch.Generator().manual_seed(12)
    shapes = torch.tensor([[3, 4], [2, 1]], device=dev)
    starts = torch.tensor([0, 12], device=dev)
    value = torch.randn(2, 14, 2, 3, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    loc = (torch.rand(2, 3, 2, 2, 2, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1).to(dev).requires_grad_()
    attn = torch.rand(2, 3, 2, 2, 2, generator=g, dtype=torch.float64).to(dev).requires_grad_()

    def fn(v, sl, aw):
        return ms_deform_attn(v, shapes, starts, sl, aw, backend="cuda")

    assert torch.autograd.gradcheck(fn, (value, loc, attn), eps=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_cuda_pixel_decoder_shape():
    """The Swin-T 1/8..1/32 levels of a 512 x 512 input, fp32 against the float64 reference."""
    cuda_kernel_or_skip()
    B, shapes, H, D, P = 1, [[64, 64], [32, 32], [16, 16]], 8, 32, 4
    S = sum(h * w for h, w in shapes)
    inputs = make_inputs(B, shapes, H, D, S, P, seed=13)
    grad_out = torch.randn(B, S, H * D, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    for backend in ("cuda", "triton") if not triton_interpret() else ("cuda",):
        out, grads = run(backend, inputs, grad_out, torch.float32, "cuda")
        ref_out, ref_grads = reference(inputs, grad_out, torch.float32)
        assert_close(out, ref_out, rtol=1e-5, atol=1e-5, name=f"{backend} out")
        for name, got, exp in zip(("grad_value", "grad_loc", "grad_attn"), grads, ref_grads):
            assert_close(got, exp, rtol=1e-5, atol=1e-5 * max(1.0, exp.abs().max().item()), name=f"{backend} {name}")


# ----------------------------------------------------------------------------------------------------
# Dispatch, custom op, torch.compile
# ----------------------------------------------------------------------------------------------------


def test_auto_on_cpu(monkeypatch, caplog):
    """auto takes the C++ kernel when it is built and the reference otherwise, saying so once."""
    expected = "cpu" if has_compiled_op("ms_deform_attn_forward") else "torch"
    assert msda._choose_backend("auto", torch.device("cpu"), torch.float32) == expected
    monkeypatch.setattr(msda, "has_compiled_op", lambda name: False)
    monkeypatch.setattr(_dispatch, "_logged", set())
    with caplog.at_level(logging.INFO, logger="cropformer.ops"):
        assert msda._choose_backend("auto", torch.device("cpu"), torch.float32) == "torch"
        assert msda._choose_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    lines = [r.getMessage() for r in caplog.records if "ms_deform_attn" in r.getMessage()]
    assert lines == ["ms_deform_attn: backend=torch (no fast path available for device=cpu dtype=torch.float32)"]
    # the Triton interpreter is never an automatic choice on CPU
    assert msda._choose_backend("auto", torch.device("cpu"), torch.float64) == "torch"


@pytest.mark.gpu
def test_auto_on_cuda():
    cuda_or_skip()
    expected = "cuda" if has_cuda_kernels() and has_compiled_op("ms_deform_attn_forward") else "triton"
    assert msda._choose_backend("auto", torch.device("cuda"), torch.float32) == expected


def test_unavailable_backend_raises():
    value, shapes, starts, loc, attn = make_inputs(*CASES["odd3"])
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        ms_deform_attn(value, shapes, starts, loc, attn, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        ms_deform_attn(value, shapes, starts, loc, attn, backend="fast")


def test_fake_impls_give_shapes():
    """The fake kernels that torch.compile traces with (no extension needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        value = torch.empty(2, 41, 3, 5)
        shapes = torch.empty(2, 2, dtype=torch.int64)
        starts = torch.empty(2, dtype=torch.int64)
        loc = torch.empty(2, 7, 3, 2, 4, 2)
        attn = torch.empty(2, 7, 3, 2, 4)
        out = torch.ops.cropformer.ms_deform_attn_fwd(value, shapes, starts, loc, attn, "cpu")
        grads = torch.ops.cropformer.ms_deform_attn_bwd(out, value, shapes, starts, loc, attn, "cpu")
    assert tuple(out.shape) == (2, 7, 15) and out.dtype == value.dtype
    assert [tuple(g.shape) for g in grads] == [tuple(value.shape), tuple(loc.shape), tuple(attn.shape)]


def fast_backend_or_skip(backend):
    if backend == "cpu":
        cpu_kernel_or_skip()
    else:
        triton_device_or_skip("cpu")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_custom_op_opcheck(backend):
    """Schema, fake kernel, autograd registration and AOT dispatch of the custom op."""
    fast_backend_or_skip(backend)
    value, shapes, starts, loc, attn = make_inputs(*CASES["odd3"])
    args = (value.float().requires_grad_(), shapes, starts, loc.float().requires_grad_(),
            attn.float().requires_grad_(), backend)
    torch.library.opcheck(torch.ops.cropformer.ms_deform_attn_fwd.default, args)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile_traces_whole_graph(backend):
    """fullgraph=True: the dispatch and the custom op trace without a break; forward and gradients
    match eager. aot_eager keeps the test fast (no inductor codegen) while still tracing the fake
    kernels of the forward and the backward."""
    fast_backend_or_skip(backend)
    value, shapes, starts, loc, attn = make_inputs(*CASES["odd3"])
    leaves = [t.float().requires_grad_() for t in (value, loc, attn)]

    def loss(v, sl, aw):
        return (ms_deform_attn(v * 2, shapes, starts, sl, aw, backend=backend) ** 2).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = compiled(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    exp = loss(*leaves)
    exp_grads = torch.autograd.grad(exp, leaves)
    assert_close(got, exp, rtol=1e-6, atol=1e-6, name="compiled loss")
    for name, a, b in zip(("value", "loc", "attn"), got_grads, exp_grads):
        assert_close(a, b, rtol=1e-6, atol=1e-6, name=f"compiled grad {name}")


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_no_queries(backend):
    if backend != "torch":
        fast_backend_or_skip(backend)
    value, shapes, starts, loc, attn = make_inputs(*CASES["odd3"])
    loc, attn = loc[:, :0].float().requires_grad_(), attn[:, :0].float().requires_grad_()
    value = value.float().requires_grad_()
    out = ms_deform_attn(value, shapes, starts, loc, attn, backend=backend)
    assert tuple(out.shape) == (2, 0, 15)
    out.sum().backward()
    assert value.grad.abs().sum() == 0


# ----------------------------------------------------------------------------------------------------
# Bad input: a clear error from every backend, never an out-of-bounds read
# ----------------------------------------------------------------------------------------------------


def _bad_inputs():
    """name -> (transform of the fp32 inputs, message pattern)."""

    def with_(i, fn):
        def apply(args):
            args = list(args)
            args[i] = fn(args[i])
            return args

        return apply

    return {
        "attn_shape": (with_(4, lambda t: t[..., :-1].contiguous()), "attention_weights must have shape"),
        "loc_heads": (with_(3, lambda t: t[:, :, :-1].contiguous()), "does not match value"),
        "loc_last_dim": (with_(3, lambda t: t[..., :1].contiguous()), "sampling_locations must be"),
        "levels_count": (with_(1, lambda t: t[:-1]), "levels but sampling_locations has"),
        "value_rank": (with_(0, lambda t: t.flatten(2)), "value must be B x S x H x D"),
        "value_noncontiguous": (with_(0, lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)),
                                "value must be contiguous"),
        "loc_noncontiguous": (with_(3, lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)),
                              "sampling_locations must be contiguous"),
        "loc_dtype": (with_(3, lambda t: t.double()), "sampling_locations must have value's dtype"),
        "shapes_dtype": (with_(1, lambda t: t.int()), "spatial_shapes must be int64"),
        # value has one pixel more than the levels describe / the last level one row more than value
        "shapes_sum_short": (with_(0, lambda t: torch.cat([t, t[:, :1]], 1)), "spatial_shapes sum to"),
        "shapes_sum_long": (with_(1, lambda t: t + torch.tensor([[0, 0], [0, 0], [1, 0]])),
                            "more pixels than|spatial_shapes sum to"),
        "shapes_zero": (with_(1, lambda t: t * torch.tensor([[1, 1], [1, 1], [0, 1]])), "must be positive"),
        "starts_wrong": (with_(2, lambda t: t + torch.tensor([0, 1, 0])), "level_start_index\\[1\\]"),
        "wrong_device": (with_(1, lambda t: t.to("meta")), "is on meta but value is on cpu"),
    }


BAD = _bad_inputs()


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_bad_input_raises(backend, bad):
    if backend != "torch":
        fast_backend_or_skip(backend)
    value, shapes, starts, loc, attn = make_inputs(*CASES["odd3"])
    transform, pattern = BAD[bad]
    args = transform([value.float(), shapes, starts, loc.float(), attn.float()])
    with pytest.raises((ValueError, TypeError, RuntimeError), match=pattern):
        ms_deform_attn(*args, backend=backend)


@pytest.mark.parametrize("bad", [b for b in BAD if b != "wrong_device"])
def test_bad_input_compiled_entry(bad):
    """The compiled op checks by itself (it can be called without the dispatch)."""
    cpu_kernel_or_skip()
    value, shapes, starts, loc, attn = make_inputs(*CASES["odd3"])
    transform, pattern = BAD[bad]
    args = transform([value.float(), shapes, starts, loc.float(), attn.float()])
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.cropformer_C.ms_deform_attn_forward(*args)
    grad_out = torch.zeros(2, 11, 15)
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.cropformer_C.ms_deform_attn_backward(grad_out, *args)


def test_bad_grad_output_compiled_entry():
    cpu_kernel_or_skip()
    value, shapes, starts, loc, attn = make_inputs(*CASES["odd3"])
    args = [value.float(), shapes, starts, loc.float(), attn.float()]
    with pytest.raises(RuntimeError, match="grad_output must have shape"):
        torch.ops.cropformer_C.ms_deform_attn_backward(torch.zeros(2, 11, 14), *args)
    with pytest.raises(RuntimeError, match="grad_output must be contiguous"):
        torch.ops.cropformer_C.ms_deform_attn_backward(torch.zeros(2, 15, 11).transpose(1, 2), *args)


# Bad level integers: on CUDA tensors checked only in debug mode (the check is a device sync).
LEVEL_CASES = ("shapes_sum_short", "shapes_sum_long", "shapes_zero", "starts_wrong")


@pytest.mark.gpu
@pytest.mark.parametrize("bad", [b for b in BAD if b != "wrong_device"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bad_input_raises_gpu(backend, bad, monkeypatch):
    dev = cuda_kernel_or_skip() if backend == "cuda" else triton_device_or_skip("cuda")
    if bad in LEVEL_CASES:
        monkeypatch.setenv("CROPFORMER_DEBUG", "1")
    value, shapes, starts, loc, attn = make_inputs(*CASES["odd3"])
    transform, pattern = BAD[bad]
    args = [t.to(dev) for t in transform([value.float(), shapes, starts, loc.float(), attn.float()])]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=pattern):
        ms_deform_attn(*args, backend=backend)
    if backend == "cuda" and bad not in LEVEL_CASES:
        with pytest.raises(RuntimeError, match=pattern):
            torch.ops.cropformer_C.ms_deform_attn_forward(*args)


def test_level_check_policy(monkeypatch):
    """Level integers are read on the host for CPU tensors; for CUDA tensors only in debug mode."""
    monkeypatch.delenv("CROPFORMER_DEBUG", raising=False)
    assert msda._levels_checked(torch.device("cpu"))
    assert not msda._levels_checked(torch.device("cuda", 0))
    monkeypatch.setenv("CROPFORMER_DEBUG", "1")
    assert msda._levels_checked(torch.device("cuda", 0))


@pytest.mark.parametrize("bad", ["shapes_sum_long", "starts_negative", "shapes_zero"])
def test_triton_kernel_skips_levels_outside_value(bad):
    """Without the host check (CUDA outside debug mode) a level that does not lie inside value is skipped by
    the kernel: zero contribution and zero gradients for its samples, and no read outside value."""
    triton_device_or_skip("cpu")
    kmod = importlib.import_module("cropformer.kernels.ms_deform_attn")
    value, shapes, starts, loc, attn = [t.float() if t.is_floating_point() else t
                                        for t in make_inputs(*CASES["odd3"], seed=4)]
    bad_shapes, bad_starts = shapes.clone(), starts.clone()
    if bad == "shapes_sum_long":  # last level 2 x 1 where value holds 1 x 1
        bad_shapes[2, 0] = 2
    elif bad == "starts_negative":
        bad_starts[2] = -1
    else:
        bad_shapes[2, 1] = 0
    kept = attn.clone()
    kept[:, :, :, 2] = 0  # the reference without the last level
    expected = ms_deform_attn_ref(value, shapes, starts, loc, kept)
    out = kmod.ms_deform_attn_forward(value, bad_shapes, bad_starts, loc, attn)
    assert_close(out, expected, name="forward without the bad level")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grad_value, grad_loc, grad_attn = kmod.ms_deform_attn_backward(grad_out, value, bad_shapes, bad_starts, loc, attn)
    assert (grad_loc[:, :, :, 2] == 0).all() and (grad_attn[:, :, :, 2] == 0).all()
    leaves = [t.clone().requires_grad_() for t in (value, loc)]
    ref = ms_deform_attn_ref(leaves[0], shapes, starts, leaves[1], kept)
    ref_grad_value, ref_grad_loc = torch.autograd.grad(ref, leaves, grad_out)
    assert_close(grad_value, ref_grad_value, name="grad_value without the bad level")
    assert_close(grad_loc[:, :, :, :2], ref_grad_loc[:, :, :, :2], name="grad_loc of the good levels")


def test_triton_launchers_enter_the_tensors_device(monkeypatch):
    """Triton launches on the current device: both launchers must make the tensors' device current."""
    triton_device_or_skip("cpu")
    entered = spy_device_guard(monkeypatch, "ms_deform_attn")
    check_parity("triton", "tiny", torch.float32)
    assert entered == [torch.device("cpu")] * 2  # forward, backward


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture(backend, monkeypatch):
    """No host sync per call: the forward is captured in a CUDA graph and replays to the eager result."""
    dev = cuda_kernel_or_skip() if backend == "cuda" else triton_device_or_skip("cuda")
    monkeypatch.delenv("CROPFORMER_DEBUG", raising=False)
    value, shapes, starts, loc, attn = [t.to(dev, torch.float32) if t.is_floating_point() else t.to(dev)
                                        for t in make_inputs(*CASES["d32"])]
    eager = ms_deform_attn(value, shapes, starts, loc, attn, backend=backend)  # warm-up (compiles Triton)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ms_deform_attn(value, shapes, starts, loc, attn, backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(captured, eager, rtol=0, atol=0, name="graph replay")


@pytest.mark.gpu
def test_triton_on_second_gpu():
    """A tensor on cuda:1 while cuda:0 is current: the launch must use cuda:1's context."""
    triton_device_or_skip("cuda")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    check_parity("triton", "odd3", torch.float32, "cuda:1")


@pytest.mark.gpu
def test_wrong_device_gpu():
    dev = cuda_or_skip()
    value, shapes, starts, loc, attn = make_inputs(*CASES["odd3"])
    with pytest.raises(ValueError, match="is on cpu but value is on cuda"):
        ms_deform_attn(value.float().to(dev), shapes, starts.to(dev), loc.float().to(dev), attn.float().to(dev))
    if has_cuda_kernels() and has_compiled_op("ms_deform_attn_forward"):
        with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
            torch.ops.cropformer_C.ms_deform_attn_forward(value.float().to(dev), shapes, starts.to(dev),
                                                          loc.float().to(dev), attn.float().to(dev))
