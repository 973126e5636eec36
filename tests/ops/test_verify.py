"""Self-verification of `auto` (cropformer.ops._dispatch.verify): a fast path made wrong inside the test
(a C++ kernel overridden through torch.library, a Triton kernel under the interpreter fed a wrong
argument) is caught by its self-test, `auto` falls back to a backend that matches the reference with ONE
warning naming op, device and error, CROPFORMER_VERIFY=strict raises instead and =off trusts it; the disk
cache is read, keyed by the build, and a corrupt file is ignored; the messages for missing backends say
what is missing.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels/ (and so triton.jit) is imported

import importlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from cropformer.ops import _dispatch  # noqa: E402
from cropformer.ops._dispatch import VerificationError, has_compiled_op, verify  # noqa: E402
from cropformer.ops.masked_attention import masked_cross_attention  # noqa: E402
from cropformer.ops.ms_deform_attn import ms_deform_attn, ms_deform_attn_ref  # noqa: E402
from tests.conftest import assert_close, triton_device_or_skip  # noqa: E402

msda = importlib.import_module("cropformer.ops.ms_deform_attn")
CPU = torch.device("cpu")
FP32 = torch.float32


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No verdict remembered by this process, an empty disk cache of its own, verification on."""
    monkeypatch.setattr(_dispatch, "_verdicts", {})
    monkeypatch.setattr(_dispatch, "_logged", set())
    monkeypatch.setenv("CROPFORMER_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CROPFORMER_VERIFY", raising=False)
    return tmp_path


def msda_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[3, 5], [2, 3]])
    starts = torch.tensor([0, 15])
    value = torch.randn(2, 21, 2, 8, generator=g)
    loc = torch.rand(2, 5, 2, 2, 3, 2, generator=g)
    attn = torch.rand(2, 5, 2, 2, 3, generator=g)
    return value, shapes, starts, loc, attn


def warnings_about(caplog, op):
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.getMessage().startswith(f"{op}:")]


def cpu_kernel_or_skip():
    if not has_compiled_op("ms_deform_attn_forward"):
        pytest.skip("C++ kernel not built (build the extension or set CROPFORMER_JIT_OPS=ms_deform_attn)")


@pytest.fixture
def wrong_cpp_kernel():
    """Replace the C++ CPU kernel of ms_deform_attn (forward or backward) by a wrong one, as a stale or
    miscompiled build would be; the original registration comes back when the library is destroyed."""
    libs = []

    def install(which):
        lib = torch.library.Library("cropformer_C", "IMPL")
        if which == "forward":
            lib.impl("ms_deform_attn_forward", lambda *args: ms_deform_attn_ref(*args) * 1.5, "CPU")
        else:  # a backward that writes no gradient (autograd is off inside a kernel, so no reference here)
            def backward(grad_out, value, shapes, starts, loc, attn):
                return torch.zeros_like(value), torch.zeros_like(loc), torch.zeros_like(attn)

            lib.impl("ms_deform_attn_backward", backward, "CPU")
        libs.append(lib)

    yield install
    for lib in libs:
        lib._destroy()


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_wrong_cpp_kernel_falls_back_with_one_warning(fresh, wrong_cpp_kernel, caplog, monkeypatch, which):
    cpu_kernel_or_skip()
    wrong_cpp_kernel(which)
    value, shapes, starts, loc, attn = msda_inputs()
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    with caplog.at_level(logging.INFO, logger="cropformer.ops"):
        for _ in range(2):  # the second call reuses the verdict: still one warning
            out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
    grads = torch.autograd.grad(out.sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    ref = ms_deform_attn_ref(ref_leaves[0], shapes, starts, ref_leaves[1], ref_leaves[2])
    assert_close(out, ref, name="auto after a failed self-test")
    for g, e in zip(grads, torch.autograd.grad(ref.sum(), ref_leaves)):
        assert_close(g, e, name="gradient after a failed self-test")
    warned = warnings_about(caplog, "ms_deform_attn")
    assert len(warned) == 1, [r.getMessage() for r in warned]
    message = warned[0].getMessage()
    assert "the cpu backend failed its self-test on cpu" in message and "off by" in message
    assert ("grad_value is off by" in message) == (which == "backward")

    monkeypatch.setenv("CROPFORMER_VERIFY", "strict")
    with pytest.raises(VerificationError, match="ms_deform_attn: the cpu backend failed its self-test"):
        ms_deform_attn(value, shapes, starts, loc, attn)
    # off trusts the build: the wrong kernel is really what `auto` would run (so the test above can fail)
    monkeypatch.setenv("CROPFORMER_VERIFY", "off")
    if which == "forward":
        assert_close(ms_deform_attn(value, shapes, starts, loc, attn), ref.detach() * 1.5, name="off")


def _wrong_launch(kernel, **changes):
    """A Triton kernel whose launcher passes wrong scalar arguments (by position), under the interpreter."""

    class Wrong:
        def __getitem__(self, grid):
            launch = kernel[grid]

            def run(*args, **kwargs):
                args = list(args)
                for index, fn in changes.items():
                    args[int(index[1:])] = fn(args[int(index[1:])])
                return launch(*args, **kwargs)

            return run

    return Wrong()


def test_wrong_triton_kernel_falls_back(fresh, caplog, monkeypatch):
    """ms_deform_attn's Triton forward told P - 1 points (skips the last sample): `auto` (allowed to try the
    interpreter here) rejects it, names the op, the device and the error, and gives the reference's result
    through the next backend."""
    triton_device_or_skip("cpu")
    kmod = importlib.import_module("cropformer.kernels.ms_deform_attn")
    # args: value, shapes, starts, loc, attn, out, n_rows, QH, S, H, D, L, P
    monkeypatch.setattr(kmod, "_ms_deform_attn_fwd_kernel", _wrong_launch(kmod._ms_deform_attn_fwd_kernel,
                                                                          a12=lambda p: p - 1))
    monkeypatch.setattr(_dispatch, "_auto_may_try", lambda name, device: True)
    value, shapes, starts, loc, attn = msda_inputs()
    with caplog.at_level(logging.WARNING, logger="cropformer.ops"):
        out = ms_deform_attn(value, shapes, starts, loc, attn)
    assert_close(out, ms_deform_attn_ref(value, shapes, starts, loc, attn), name="auto after a failed Triton test")
    warned = warnings_about(caplog, "ms_deform_attn")
    assert len(warned) == 1 and "the triton backend failed its self-test on cpu" in warned[0].getMessage()
    assert "out is off by" in warned[0].getMessage()
    monkeypatch.setenv("CROPFORMER_VERIFY", "strict")
    with pytest.raises(VerificationError, match="triton backend failed its self-test"):
        ms_deform_attn(value, shapes, starts, loc, attn)


def test_wrong_triton_backward_is_caught(fresh, monkeypatch):
    """A wrong softmax scale in masked attention's dk/dv kernel only: the self-test compares every gradient."""
    triton_device_or_skip("cpu")
    kmod = importlib.import_module("cropformer.kernels.masked_attention")
    # dkdv args: q, k, v, mask, row_open, grad_out, lse, delta, dk, dv (0-9), strides of q, k, v (4 each),
    # mask (3), grad_out (4) (10-28), H, Q, K, D, qk_scale_log2, sm_scale (29-34)
    monkeypatch.setattr(kmod, "_masked_attention_bwd_dkdv_kernel",
                        _wrong_launch(kmod._masked_attention_bwd_dkdv_kernel, a34=lambda s: 2 * s))
    error = verify("masked_cross_attention", "triton", CPU, FP32)
    assert error is not None and "dk is off by" in error, error
    monkeypatch.setenv("CROPFORMER_VERIFY", "strict")
    with pytest.raises(VerificationError, match="masked_cross_attention: the triton backend"):
        verify("masked_cross_attention", "triton", CPU, FP32)


SELFTEST_CASES = [("ms_deform_attn", "cpu", FP32), ("ms_deform_attn", "cpu", torch.bfloat16),
                  ("ms_deform_attn", "triton", FP32), ("masked_cross_attention", "cpu", FP32),
                  ("masked_cross_attention", "cpu", torch.bfloat16), ("masked_cross_attention", "triton", FP32)]


@pytest.mark.parametrize("op,backend,dtype", SELFTEST_CASES)
def test_selftests_pass_on_correct_kernels(op, backend, dtype):
    """A self-test that failed on a correct kernel would silently cost users the fast path."""
    if backend == "triton":
        triton_device_or_skip("cpu")
    elif op == "ms_deform_attn":
        cpu_kernel_or_skip()
    assert _dispatch.run_selftest(op, backend, CPU, dtype) is None


def test_every_op_registers_a_selftest():
    import cropformer.ops  # noqa: F401  (each op module registers itself at import)

    for op in ("ms_deform_attn", "masked_cross_attention"):
        assert op in _dispatch.PREFERENCES and op in _dispatch.SELFTESTS


def test_selftest_leaves_the_global_rng_alone(fresh):
    state = torch.get_rng_state()
    assert _dispatch.run_selftest("masked_cross_attention", "cpu", CPU, FP32) is None
    assert torch.equal(state, torch.get_rng_state())


def test_selftest_runs_under_no_grad_and_inference_mode(fresh):
    q = torch.randn(1, 2, 3, 32)
    with torch.inference_mode():
        masked_cross_attention(q, q, q, torch.randn(1, 3, 3))
    assert _dispatch._verdicts[("masked_cross_attention", "cpu", "cpu", FP32)] is None


def test_selftest_runs_on_real_tensors_while_tracing(fresh):
    """An op first met while torch.export traces with fake tensors still gets a real verdict."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert verify("masked_cross_attention", "cpu", CPU, FP32) is None
    assert _dispatch._verdicts[("masked_cross_attention", "cpu", "cpu", FP32)] is None


def test_disk_cache(fresh, monkeypatch):
    """A pass is written to the cache folder and trusted by the next process (here: a cleared memory),
    but only for the same build; a corrupt file is ignored; failures are never written."""
    cpu_kernel_or_skip()
    assert verify("ms_deform_attn", "cpu", CPU, FP32) is None
    data = json.loads((fresh / _dispatch._CACHE_FILE).read_text())
    assert list(data.values()) == ["passed"]
    (key,) = data
    assert key.startswith("ms_deform_attn | cpu | torch.float32 | cpu ") and f"torch {torch.__version__}" in key

    def broken(backend, device, dtype):
        raise AssertionError("the self-test ran")

    monkeypatch.setitem(_dispatch.SELFTESTS, "ms_deform_attn", broken)
    monkeypatch.setattr(_dispatch, "_verdicts", {})
    assert verify("ms_deform_attn", "cpu", CPU, FP32) is None  # from disk: the test did not run

    monkeypatch.setattr(_dispatch, "_verdicts", {})
    monkeypatch.setattr(_dispatch, "build_identity", lambda backend: "another build")
    assert "the self-test ran" in verify("ms_deform_attn", "cpu", CPU, FP32)
    assert list(json.loads((fresh / _dispatch._CACHE_FILE).read_text()).values()) == ["passed"]

    monkeypatch.undo()  # also restores the caller's CROPFORMER_VERIFY (CI runs with strict): default mode again
    monkeypatch.delenv("CROPFORMER_VERIFY", raising=False)
    monkeypatch.setitem(_dispatch.SELFTESTS, "ms_deform_attn", broken)
    monkeypatch.setattr(_dispatch, "_verdicts", {})
    monkeypatch.setenv("CROPFORMER_CACHE_DIR", str(fresh))
    (fresh / _dispatch._CACHE_FILE).write_text("{not json")
    assert "the self-test ran" in verify("ms_deform_attn", "cpu", CPU, FP32)


def test_unwritable_cache_only_costs_a_recheck(fresh, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("CROPFORMER_CACHE_DIR", str(blocker / "sub"))  # cannot be created
    assert verify("masked_cross_attention", "cpu", CPU, FP32) is None


def test_verify_modes(fresh, monkeypatch):
    def broken(backend, device, dtype):
        raise RuntimeError("boom")

    monkeypatch.setitem(_dispatch.SELFTESTS, "masked_cross_attention", broken)
    monkeypatch.setenv("CROPFORMER_VERIFY", "off")
    assert verify("masked_cross_attention", "cpu", CPU, FP32) is None
    monkeypatch.setenv("CROPFORMER_VERIFY", "on")
    assert verify("masked_cross_attention", "cpu", CPU, FP32) == "RuntimeError: boom"
    # auto then takes the reference on CPU
    assert importlib.import_module("cropformer.ops.masked_attention")._choose_backend(
        "auto", CPU, FP32) == "torch"
    monkeypatch.setenv("CROPFORMER_VERIFY", "sometimes")
    with pytest.raises(ValueError, match="CROPFORMER_VERIFY='sometimes'"):
        verify("masked_cross_attention", "cpu", CPU, FP32)


# ----------------------------------------------------------------------------------------------------
# What is missing, in words
# ----------------------------------------------------------------------------------------------------


def test_cuda_backend_message_on_a_cpu_only_build(monkeypatch):
    """Asking for CUDA kernels the build lacks says exactly that, never "extension built: True"."""
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(_dispatch, "compiled_extension", lambda: object())  # loaded, without WITH_CUDA
    monkeypatch.setattr(_dispatch, "_jit_cuda", False)
    with pytest.raises(RuntimeError) as info:
        _dispatch.resolve("ms_deform_attn", "cuda", gpu, FP32, msda._PREFERENCE)
    assert "built without CUDA kernels" in str(info.value) and "extension built" not in str(info.value)
    monkeypatch.setattr(_dispatch, "compiled_extension", lambda: None)
    monkeypatch.setattr(_dispatch, "extension_problem", lambda: "not built (no compiled cropformer/_C*.so)")
    with pytest.raises(RuntimeError, match="cropformer._C is not built"):
        _dispatch.resolve("ms_deform_attn", "cuda", gpu, FP32, msda._PREFERENCE)
    monkeypatch.setattr(_dispatch, "triton_available", lambda: False)
    assert _dispatch.unavailable_reason("triton", gpu, FP32) == "triton is not installed"
    assert "CPU tensors only" in _dispatch.unavailable_reason("cpu", gpu, FP32)


class _CudaBuild:
    WITH_CUDA = True
    CUDA_ARCHS = "900,1000"


def test_gpu_architecture_missing_from_the_build(monkeypatch, caplog):
    """A build for sm_90/sm_100 only on an sm_80 GPU: `auto` skips the CUDA kernels (saying why), an explicit
    request says which architectures the build has."""
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(_dispatch, "compiled_extension", lambda: _CudaBuild)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert _dispatch.cuda_build_archs() == [90, 100]
    problem = _dispatch.cuda_arch_problem(gpu)
    assert "sm_80 is not in the build (built for sm_90, sm_100" in problem
    preference = [("cuda", lambda device, dtype: True, "compiled CUDA kernel")]
    monkeypatch.setattr(_dispatch, "_logged", set())
    with caplog.at_level(logging.INFO, logger="cropformer.ops"):
        assert _dispatch.resolve("op", "auto", gpu, FP32, preference) == "torch"
    assert any("sm_80 is not in the build" in r.getMessage() for r in caplog.records)
    with pytest.raises(RuntimeError, match="sm_80 is not in the build"):
        _dispatch.resolve("op", "cuda", gpu, FP32, preference)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _dispatch.cuda_arch_problem(gpu) is None


def test_no_kernel_image_failure_names_the_architecture(monkeypatch):
    monkeypatch.setattr(_dispatch, "compiled_extension", lambda: _CudaBuild)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    exc = RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore")
    text = _dispatch._describe_failure(exc, torch.device("cuda", 0))
    assert text.startswith("the build has no code for this GPU's architecture sm_86 (built for sm_90, sm_100)")


def test_failed_extension_import_is_a_warning(monkeypatch, caplog):
    real_import = importlib.import_module

    def failing(name, *args):
        if name == "cropformer._C":
            raise ImportError("undefined symbol: _ZN3c10")
        return real_import(name, *args)

    _dispatch._load_extension.cache_clear()
    monkeypatch.setattr(_dispatch.importlib, "import_module", failing)
    try:
        with caplog.at_level(logging.INFO, logger="cropformer.ops"):
            if importlib.util.find_spec("cropformer._C") is None:
                pytest.skip("no built extension to fail importing")
            assert _dispatch.compiled_extension() is None
        assert _dispatch.extension_problem() == "failed to import (undefined symbol: _ZN3c10)"
        (record,) = [r for r in caplog.records if "cropformer._C" in r.getMessage()]
        assert record.levelno == logging.WARNING
    finally:
        monkeypatch.undo()
        _dispatch._load_extension.cache_clear()


def test_stale_extension_detected(tmp_path):
    so = tmp_path / "_C.so"
    so.write_text("")
    os.utime(so, (0, 0))  # built in 1970: every source is newer
    assert _dispatch._newer_sources(str(so)).startswith("csrc/")
    os.utime(so, None)
    assert _dispatch._newer_sources(str(so)) is None


def test_cuda_device_guard():
    """Triton launchers enter the tensors' device (Triton launches on the current one); nothing for CPU."""
    guard = _dispatch.cuda_device_guard(torch.device("cuda", 1))  # constructing it touches no GPU
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with _dispatch.cuda_device_guard(CPU):
        pass
