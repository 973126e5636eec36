"""Masked cross-attention: the torch reference against a dense formula and the mask rules, the Triton
kernels (CPU under TRITON_INTERPRET=1, compiled on a GPU) against the float64 reference, the dispatch,
the custom op, input validation and the reference's memory.

The compiled GPU tests need the interpreter off, which this module turns on unless told otherwise:
``TRITON_INTERPRET=0 python -m pytest tests/ops/test_masked_attention.py -m gpu``.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels/ (and so triton.jit) is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from cropformer.ops import masked_attention as ma  # noqa: E402
from cropformer.ops.masked_attention import (  # noqa: E402
    attention_block_mask,
    masked_cross_attention,
    masked_cross_attention_ref,
)
from tests.bench.common import cpu_peak_bytes  # noqa: E402
from tests.bench.test_bench_masked_attention import sdpa_dense  # noqa: E402
from tests.conftest import assert_close, nan_filled_empty, triton_device_or_skip  # noqa: E402

# B, H, Q, K, D. Q and K prime or one past a block (16 / 64) so every kernel has partial tail blocks;
# K = 1 is the one-key edge (each row is then fully open or fully blocked, hence opened);
# D = 32 and 64 are the decoders' head sizes (256 / 8 heads) and a wider one.
SHAPES = [
    (1, 2, 37, 67, 32),
    (2, 1, 64, 65, 64),
    (1, 1, 1, 1, 32),
    (2, 2, 17, 1, 64),
]
# Fraction of open keys per row: nearly all blocked (many rows then fully blocked), mixed, nearly open.
DENSITIES = [0.01, 0.3, 0.99]
# Kernel tuning: the heuristics (one block / one split at these sizes) and small blocks with three key
# splits, which reach the multi-block loops, the split-key merge and the fp32 dq partial sums.
TUNINGS = {"default": {}, "split": dict(block_q=16, block_k=16, num_splits=3)}


@pytest.fixture(autouse=True)
def _ieee_fp32_products():
    """fp32 tolerances assume IEEE fp32 products; the kernel follows torch's TF32 switch, as matmul does.
    (Saved and restored by hand: it is a property, which pytest's monkeypatch cannot always restore.)"""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def make_inputs(B, H, Q, K, D, density, dtype=torch.float64, device="cpu", seed=0):
    """q, k, v (float64 leaves) and mask logits with `density` of the keys open. The first row is
    fully blocked and the last fully open (when Q > 2). Logits are rounded to `dtype` first so the
    reference and the kernel see the same signs."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Q, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, K, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, K, D, generator=g, dtype=torch.float64)
    logits = (density - torch.rand(B, Q, K, generator=g, dtype=torch.float64)) * 4
    if Q > 2:
        logits[:, 0] = -logits[:, 0].abs() - 0.1
        logits[:, -1] = logits[:, -1].abs() + 0.1
    logits = logits.to(dtype)
    return [t.to(device) for t in (q, k, v, logits)]


def dense_formula(q, k, v, mask_logits):
    """Independent dense formula: per-head additive mask, explicit softmax."""
    B, H, Q, D = q.shape
    blocked = mask_logits < 0
    blocked = blocked & ~blocked.all(-1, keepdim=True)
    per_head = blocked[:, None].expand(B, H, Q, k.shape[2])
    bias = torch.zeros(per_head.shape, dtype=q.dtype).masked_fill(per_head, float("-inf"))
    weights = torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5 + bias, dim=-1)
    return weights @ v


def grads(fn, q, k, v, logits, grad_out):
    """(out, dq, dk, dv) of fn at leaves copied from q, k, v."""
    q, k, v = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(q, k, v, logits)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def _kernel(tuning):
    from cropformer.kernels.masked_attention import masked_attention

    return lambda q, k, v, m: masked_attention(q, k, v, m, **tuning)


# ---------------------------------------------------------------------------------------------------
# Reference: mask rules and dense formula.
# ---------------------------------------------------------------------------------------------------


def test_block_mask_rules():
    logits = torch.tensor([[[-1.0, -2.0, -0.5],   # all blocked -> all opened
                            [-1.0, 0.0, -3.0],    # 0 is open (sigmoid(0) = 0.5 is not < 0.5)
                            [float("nan"), -1.0, 2.0],  # NaN is not < 0: open
                            [1.0, 2.0, 3.0]]])
    expected = torch.tensor([[[False, False, False],
                              [True, False, True],
                              [False, True, False],
                              [False, False, False]]])
    assert torch.equal(attention_block_mask(logits), expected)


def test_ref_rows_follow_the_rules():
    """A fully blocked row equals unmasked attention; a row with one open key returns that key's v."""
    q, k, v, logits = make_inputs(2, 3, 5, 11, 8, density=0.5)
    logits[:, 0] = -1.0
    logits[:, 1] = -1.0
    logits[:, 1, 4] = 0.5
    out = masked_cross_attention_ref(q, k, v, logits)
    unmasked = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v
    assert_close(out[:, :, 0], unmasked[:, :, 0], rtol=1e-12, atol=1e-12, name="fully blocked row")
    assert_close(out[:, :, 1], v[:, :, 4], rtol=1e-12, atol=1e-12, name="one open key")


@pytest.mark.parametrize("query_chunk", [None, 1, 6])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("B,H,Q,K,D", [(2, 3, 13, 29, 8), (1, 2, 1, 1, 4)])
def test_ref_matches_dense_formula(B, H, Q, K, D, density, query_chunk):
    """The chunked, recomputing reference equals the dense formula, forward and every gradient."""
    q, k, v, logits = make_inputs(B, H, Q, K, D, density)
    grad_out = torch.randn(B, H, Q, D, dtype=torch.float64)
    actual = grads(lambda *a: masked_cross_attention_ref(*a, query_chunk=query_chunk), q, k, v, logits, grad_out)
    expected = grads(dense_formula, q, k, v, logits, grad_out)
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert_close(a, e, rtol=1e-10, atol=1e-10, name=name)


def test_memory_below_dense_composition():
    """With grad, the peaks of the reference and of the "cpu" path (CPU allocator, via the profiler)
    stay below one B x H x Q x K score tensor and below SDPA with the mask expanded per head. Sizes
    chosen so that the scores dominate."""
    B, H, Q, K, D = 1, 4, 96, 2048, 8
    q, k, v, logits = [t.float() for t in make_inputs(B, H, Q, K, D, density=0.3)]
    for t in (q, k, v):
        t.requires_grad_()
    scores_bytes = B * H * Q * K * 4

    def peak(fn):
        return cpu_peak_bytes(lambda: fn(q, k, v, logits).sum().backward())

    dense_peak = peak(sdpa_dense)
    ref_peak = peak(lambda *a: masked_cross_attention_ref(*a, query_chunk=8))
    cpu_path_peak = peak(lambda *a: masked_cross_attention(*a, backend="cpu"))
    print(f"peak MiB: reference {ref_peak / 2**20:.2f}, cpu path {cpu_path_peak / 2**20:.2f}, "
          f"dense-mask SDPA {dense_peak / 2**20:.2f}; scores {scores_bytes / 2**20:.2f}")
    for name, value in (("reference", ref_peak), ("cpu path", cpu_path_peak)):
        assert 0 < value < scores_bytes, name
        assert value < dense_peak, name


# ---------------------------------------------------------------------------------------------------
# "cpu" path (SDPA, mask broadcast over heads) against the float64 reference.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("B,H,Q,K,D", SHAPES)
def test_cpu_path_parity(B, H, Q, K, D, density, dtype):
    q, k, v, logits = make_inputs(B, H, Q, K, D, density, dtype=dtype)
    grad_out = torch.randn(B, H, Q, D, dtype=torch.float64)
    expected = grads(masked_cross_attention_ref, q, k, v, logits.double(), grad_out)
    actual = grads(lambda *a: masked_cross_attention(*a, backend="cpu"),
                   *(t.to(dtype) for t in (q, k, v, logits, grad_out)))
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert a.dtype == dtype
        assert_close(a, e, rtol=tol, atol=tol, name=name)


# ---------------------------------------------------------------------------------------------------
# Triton kernels against the float64 reference.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tuning", list(TUNINGS), ids=list(TUNINGS))
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("B,H,Q,K,D", SHAPES)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_triton_fp32_parity(device, B, H, Q, K, D, density, tuning):
    dev = triton_device_or_skip(device)
    q, k, v, logits = make_inputs(B, H, Q, K, D, density, dtype=torch.float32)
    grad_out = torch.randn(B, H, Q, D, dtype=torch.float64)
    expected = grads(masked_cross_attention_ref, q, k, v, logits.double(), grad_out)
    with nan_filled_empty():  # an output element the kernels forget to write is NaN, not luck
        actual = grads(_kernel(TUNINGS[tuning]), *(t.to(dev, torch.float32) for t in (q, k, v, logits)),
                       grad_out.to(dev, torch.float32))
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        assert_close(a, e, rtol=1e-5, atol=1e-5, name=name)


def assert_within_torch_error(actual, torch_lowp, expected):
    """Low precision (practice 9): the kernel's max error against float64 is at most a small multiple of
    what the torch reference loses in the same dtype, plus a 1e-3 floor. The multiple is 2 for the
    output and 3 for gradients: like flash-attention the kernel rounds P and dS to the input dtype
    before its tensor-core products, where torch rounds scores and their gradients instead (over 16
    seeds at the CPU test shapes: bf16 up to 1.8x for out, 2.8x for gradients; fp16 below 1.9x)."""
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), actual, torch_lowp, expected):
        assert a.dtype == t.dtype, f"{name}: dtype {a.dtype}, expected {t.dtype}"
        kernel_err = (a.double().cpu() - e.cpu()).abs().max().item()
        torch_err = (t.double().cpu() - e.cpu()).abs().max().item()
        factor = 2 if name == "out" else 3
        print(f"{name}: kernel err {kernel_err:.3e}, torch {t.dtype} err {torch_err:.3e}")
        assert kernel_err <= factor * torch_err + 1e-3, \
            f"{name}: kernel err {kernel_err:.3e} > {factor} x torch {torch_err:.3e} + 1e-3"


@pytest.mark.parametrize("tuning", list(TUNINGS), ids=list(TUNINGS))
@pytest.mark.parametrize("B,H,Q,K,D", [SHAPES[0], SHAPES[1]])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_triton_low_precision_parity(device, dtype, B, H, Q, K, D, tuning):
    dev = triton_device_or_skip(device)
    q, k, v, logits = make_inputs(B, H, Q, K, D, 0.3, dtype=dtype)
    q, k, v = [t.to(dtype).double() for t in (q, k, v)]  # exactly representable in dtype
    grad_out = torch.randn(B, H, Q, D, dtype=torch.float64).to(dtype).double()
    expected = grads(masked_cross_attention_ref, q, k, v, logits.double(), grad_out)
    lowp = [t.to(dev, dtype) for t in (q, k, v, logits, grad_out)]
    with nan_filled_empty():
        actual = grads(_kernel(TUNINGS[tuning]), *lowp)
    assert_within_torch_error(actual, grads(masked_cross_attention_ref, *lowp), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cpu_path_low_precision(dtype):
    B, H, Q, K, D = SHAPES[0]
    q, k, v, logits = make_inputs(B, H, Q, K, D, 0.3, dtype=dtype)
    q, k, v = [t.to(dtype).double() for t in (q, k, v)]
    grad_out = torch.randn(B, H, Q, D, dtype=torch.float64).to(dtype).double()
    expected = grads(masked_cross_attention_ref, q, k, v, logits.double(), grad_out)
    lowp = [t.to(dtype) for t in (q, k, v, logits, grad_out)]
    assert_within_torch_error(grads(lambda *a: masked_cross_attention(*a, backend="cpu"), *lowp),
                              grads(masked_cross_attention_ref, *lowp), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_decoder_shape_gpu(dtype):
    """Decoder-sized case on the GPU through the dispatch, automatic blocks and key splits (K = 64 x 64 + 3)."""
    dev = triton_device_or_skip("cuda")
    B, H, Q, K, D = 2, 8, 200, 64 * 64 + 3, 32
    q, k, v, logits = make_inputs(B, H, Q, K, D, 0.2, dtype=dtype, device=dev)
    q, k, v = [t.to(dtype).double() for t in (q, k, v)]
    grad_out = torch.randn(B, H, Q, D, dtype=torch.float64, device=dev).to(dtype).double()
    expected = grads(masked_cross_attention_ref, q, k, v, logits.double(), grad_out)
    lowp = [t.to(dtype) for t in (q, k, v, logits, grad_out)]
    actual = grads(lambda *a: masked_cross_attention(*a, backend="triton"), *lowp)
    if dtype == torch.float32:
        for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
            assert_close(a, e, rtol=1e-5, atol=1e-5, name=name)
    else:
        assert_within_torch_error(actual, grads(masked_cross_attention_ref, *lowp), expected)


@pytest.mark.parametrize("tuning", list(TUNINGS), ids=list(TUNINGS))
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_triton_logit_edge_values(device, tuning):
    """Rows whose only open key has logit 0.0, -0.0 or NaN (all open: none is < 0), next to a fully
    blocked row; random logits never produce these values."""
    dev = triton_device_or_skip(device)
    B, H, Q, K, D = 1, 2, 5, 37, 32
    q, k, v, logits = make_inputs(B, H, Q, K, D, 0.5, dtype=torch.float32)
    logits[:, :4] = -1.0
    logits[0, 0, 5] = 0.0
    logits[0, 1, 20] = -0.0
    logits[0, 2, 36] = float("nan")
    grad_out = torch.randn(B, H, Q, D, dtype=torch.float64)
    expected = grads(masked_cross_attention_ref, q, k, v, logits.double(), grad_out)
    actual = grads(_kernel(TUNINGS[tuning]), *(t.to(dev, torch.float32) for t in (q, k, v, logits)),
                   grad_out.to(dev, torch.float32))
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert_close(a, e, rtol=1e-5, atol=1e-5, name=name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_triton_strided_inputs(device):
    """Non-contiguous q (B x Q x H x D transposed, as a decoder produces it), k, v and logits."""
    dev = triton_device_or_skip(device)
    B, H, Q, K, D = 2, 2, 19, 41, 32
    q, k, v, logits = make_inputs(B, H, Q, K, D, 0.3, dtype=torch.float32)
    q_s = q.float().transpose(1, 2).contiguous().transpose(1, 2)
    k_s = k.float().permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    v_s = torch.cat([v.float(), v.float()], dim=-1)[..., :D]
    logits_s = logits.transpose(1, 2).contiguous().transpose(1, 2)
    assert not any(t.is_contiguous() for t in (q_s, k_s, v_s, logits_s))
    grad_out = torch.randn(B, H, Q, D, dtype=torch.float64)
    expected = grads(masked_cross_attention_ref, q, k, v, logits.double(), grad_out)
    actual = grads(lambda *a: masked_cross_attention(*a, backend="triton"),
                   *(t.to(dev) for t in (q_s, k_s, v_s, logits_s)), grad_out.float().to(dev))
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert_close(a, e, rtol=1e-5, atol=1e-5, name=name)


# ---------------------------------------------------------------------------------------------------
# Dispatch, custom op, validation.
# ---------------------------------------------------------------------------------------------------


def test_dispatch_triton_matches_reference():
    """backend="triton" goes through the custom op and its registered autograd."""
    triton_device_or_skip("cpu")
    q, k, v, logits = make_inputs(1, 2, 23, 45, 32, 0.2, dtype=torch.float32)
    grad_out = torch.randn(1, 2, 23, 32, dtype=torch.float64)
    expected = grads(masked_cross_attention_ref, q, k, v, logits.double(), grad_out)
    actual = grads(lambda *a: masked_cross_attention(*a, backend="triton"),
                   q.float(), k.float(), v.float(), logits, grad_out.float())
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert_close(a, e, rtol=1e-5, atol=1e-5, name=name)


def test_triton_launchers_enter_the_tensors_device(monkeypatch):
    """Triton launches on the current device: every launcher makes the tensors' device current."""
    triton_device_or_skip("cpu")
    import cropformer.kernels.masked_attention as km

    entered = []
    real_guard = km.cuda_device_guard
    monkeypatch.setattr(km, "cuda_device_guard", lambda device: entered.append(device) or real_guard(device))
    q, k, v, logits = make_inputs(1, 2, 5, 7, 32, 0.5, dtype=torch.float32)
    grads(lambda *a: masked_cross_attention(*a, backend="triton"), q.float(), k.float(), v.float(), logits,
          torch.randn(1, 2, 5, 32))
    assert entered == [torch.device("cpu")] * 4  # row flags, forward, dk/dv, dq


@pytest.mark.gpu
def test_triton_on_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current: the launches must use cuda:1."""
    dev = triton_device_or_skip("cuda")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    q, k, v, logits = make_inputs(1, 2, 23, 45, 32, 0.2, dtype=torch.float32)
    grad_out = torch.randn(1, 2, 23, 32, dtype=torch.float64)
    expected = grads(masked_cross_attention_ref, q, k, v, logits.double(), grad_out)
    second = torch.device("cuda", 1)
    actual = grads(lambda *a: masked_cross_attention(*a, backend="triton"),
                   *(t.to(second, torch.float32) for t in (q, k, v, logits, grad_out)))
    assert dev.type == "cuda" and actual[0].device == second
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert_close(a, e, rtol=1e-5, atol=1e-5, name=name)


def test_custom_op_opcheck():
    """Schema, fake (meta) implementation and autograd registration of the Triton custom op."""
    triton_device_or_skip("cpu")
    q, k, v, logits = [t.float() for t in make_inputs(1, 2, 9, 18, 32, 0.4)]
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.cropformer.masked_cross_attention_fwd.default, (q, k, v, logits),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_auto_on_cpu_picks_sdpa_path(monkeypatch):
    """auto takes the "cpu" path on CPU, never the Triton interpreter, even with TRITON_INTERPRET=1."""
    chosen = []
    real_resolve = ma.resolve

    def spy(op, backend, *args):
        choice = real_resolve(op, backend, *args)
        if backend == "auto":  # not the self-test's own explicit call
            chosen.append(choice)
        return choice

    monkeypatch.setattr(ma, "resolve", spy)
    q, k, v, logits = [t.float() for t in make_inputs(1, 2, 5, 7, 32, 0.5)]
    out = masked_cross_attention(q, k, v, logits)
    assert chosen == ["cpu"]
    assert torch.equal(out, masked_cross_attention(q, k, v, logits, backend="cpu"))


def test_unavailable_backend_raises():
    q, k, v, logits = [t.float() for t in make_inputs(1, 1, 3, 4, 32, 0.5)]
    with pytest.raises(RuntimeError, match="not implemented"):
        masked_cross_attention(q, k, v, logits, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        masked_cross_attention(q, k, v, logits, backend="fast")
    with pytest.raises(RuntimeError, match="not available"):
        masked_cross_attention(q.double(), k.double(), v.double(), logits, backend="triton")


def test_triton_head_size_limit(monkeypatch):
    """Heads wider than the kernels' MAX_HEAD_DIM (their tiles would not fit in shared memory): an
    explicit backend="triton" refuses them, auto (which picks Triton on a GPU) takes the reference."""
    triton_device_or_skip("cpu")
    q, k, v, logits = [t.float() for t in make_inputs(1, 1, 3, 4, 129, 0.5)]
    with pytest.raises(RuntimeError, match="head sizes up to 128, got D = 129"):
        masked_cross_attention(q, k, v, logits, backend="triton")
    monkeypatch.setattr(ma, "resolve", lambda *args: "triton")  # auto's choice on a GPU
    assert torch.equal(masked_cross_attention(q, k, v, logits), masked_cross_attention_ref(q, k, v, logits))


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_no_queries(backend):
    if backend == "triton":
        triton_device_or_skip("cpu")
    q, k, v, logits = [t.float() for t in make_inputs(2, 2, 0, 5, 32, 0.5)]
    out = masked_cross_attention(q, k, v, logits, backend=backend)
    assert out.shape == (2, 2, 0, 32)


def _bad(**changes):
    """Valid inputs (B=2, H=3, Q=5, K=7, D=32) with some replaced."""
    inputs = dict(q=torch.randn(2, 3, 5, 32), k=torch.randn(2, 3, 7, 32), v=torch.randn(2, 3, 7, 32),
                  mask_logits=torch.randn(2, 5, 7))
    inputs.update(changes)
    return inputs


BAD_INPUTS = {
    "k batch": (_bad(k=torch.randn(1, 3, 7, 32)), ValueError, "k has shape"),
    "k heads": (_bad(k=torch.randn(2, 4, 7, 32)), ValueError, "k has shape"),
    "k head dim": (_bad(k=torch.randn(2, 3, 7, 16)), ValueError, "k has shape"),
    "v keys": (_bad(v=torch.randn(2, 3, 8, 32)), ValueError, "v has shape"),
    "v head dim": (_bad(v=torch.randn(2, 3, 7, 64)), ValueError, "v has shape"),
    "mask keys": (_bad(mask_logits=torch.randn(2, 5, 8)), ValueError, "mask_logits has shape"),
    "mask queries": (_bad(mask_logits=torch.randn(2, 6, 7)), ValueError, "mask_logits has shape"),
    "mask batch": (_bad(mask_logits=torch.randn(1, 5, 7)), ValueError, "mask_logits has shape"),
    "mask per head": (_bad(mask_logits=torch.randn(2, 3, 5, 7)), ValueError, "mask_logits must have 3 dims"),
    "q 3d": (_bad(q=torch.randn(2, 5, 32)), ValueError, "q must have 4 dims"),
    "no keys": (_bad(k=torch.randn(2, 3, 0, 32), v=torch.randn(2, 3, 0, 32), mask_logits=torch.randn(2, 5, 0)),
                ValueError, "at least one key"),
    "dtype mix": (_bad(k=torch.randn(2, 3, 7, 32, dtype=torch.float64)), TypeError, "one floating dtype"),
    "bool mask": (_bad(mask_logits=torch.ones(2, 5, 7, dtype=torch.bool)), TypeError, "floating point logits"),
}


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu", "triton"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise(case, backend):
    inputs, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        masked_cross_attention(**inputs, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_torch_compile_fullgraph(backend):
    """torch.compile traces the dispatch and the custom op (fake kernels, registered autograd) in one graph."""
    if backend == "triton":
        triton_device_or_skip("cpu")
    q, k, v, logits = [t.float() for t in make_inputs(1, 2, 9, 18, 32, 0.4)]
    grad_out = torch.randn(1, 2, 9, 32, dtype=torch.float64)
    compiled = torch.compile(lambda *a: masked_cross_attention(*a, backend=backend), backend="aot_eager",
                             fullgraph=True)
    expected = grads(masked_cross_attention_ref, q.double(), k.double(), v.double(), logits.double(), grad_out)
    actual = grads(compiled, q, k, v, logits, grad_out.float())
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert_close(a, e, rtol=1e-5, atol=1e-5, name=name)


_AOT_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import cropformer.kernels.masked_attention as km

ptrs = {"row_open_ptr": "*i32", "o_ptr": "*fp32", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "dq_ptr": "*fp32"}
ints = {"B", "H", "Q", "K", "D", "keys_per_split"}
blocks = dict(BLOCK_Q=64, BLOCK_K=64, BLOCK_D=32, PRECISION="tf32", UPCAST=False)
for fn, consts in ((km._masked_attention_rows_kernel, dict(BLOCK_Q=32, BLOCK_K=128)),
                   (km._masked_attention_fwd_kernel, blocks),
                   (km._masked_attention_bwd_dkdv_kernel, blocks),
                   (km._masked_attention_bwd_dq_kernel, blocks)):
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "*bf16") if n.endswith("_ptr")
           else "i32" if n.startswith("s_") or n in ints else "fp32" for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
    print("compiled", fn.__name__)
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Without a GPU, compile the four kernels (bf16, D = 32) to sm_90 machine code with the interpreter
    off, so code that only the compiler rejects fails here and not first on a GPU."""
    import subprocess
    import sys

    pytest.importorskip("triton.compiler")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _AOT_COMPILE], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled") == 4, proc.stdout
