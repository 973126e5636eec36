"""Shared test helpers: reference-data location, device skips, verbose comparisons."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

# Triton kernels run on CPU tensors under the interpreter; it must be chosen before triton is first
# imported. The GPU suite (scripts/gpu_suite.sh) sets TRITON_INTERPRET=0 to compile them instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# ../shared/reference next to the checkout (CI lays shared/ beside the clone); override by env.
REFERENCE = Path(os.environ.get("CROPFORMER_REFERENCE", REPO.parent / "shared" / "reference"))


def reference_dir(name: str) -> Path:
    """Path of a reference folder, or skip the test with the reason."""
    path = REFERENCE / name
    if not path.is_dir():
        pytest.skip(f"reference data {path} not present (set CROPFORMER_REFERENCE)")
    return path


def load_reference(name: str, file: str) -> dict:
    return torch.load(reference_dir(name) / file, map_location="cpu", weights_only=True)


def cuda_or_skip() -> torch.device:
    """Call inside a test (never at import): skip cleanly without a GPU."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda")


def assert_close(actual, expected, rtol=1e-5, atol=1e-5, name="tensor"):
    """torch.testing.assert_close with the worst indices and values in the message."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    err = (a - e).abs()
    tol = atol + rtol * e.abs()
    bad = ~(err <= tol)
    if bad.any():
        idx = torch.nonzero(bad)[:5].tolist()
        worst = err.flatten().argmax().item()
        wi = list(torch.unravel_index(torch.tensor(worst), err.shape)) if err.dim() else []
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements out of tolerance (rtol={rtol}, atol={atol}); "
            f"max abs err {err.max().item():.3e} at {[int(i) for i in wi]} "
            f"(actual {a.flatten()[worst].item():.6g}, expected {e.flatten()[worst].item():.6g}); "
            f"first bad indices {idx}"
        )


def pytest_configure(config):
    # Development aid: CROPFORMER_JIT_OPS=ms_deform_attn,paste compiles those csrc/ folders with the
    # JIT loader instead of needing `setup.py build_ext` (the built extension is used when present).
    ops = [o for o in os.environ.get("CROPFORMER_JIT_OPS", "").split(",") if o]
    if ops:
        from cropformer.ops._dispatch import jit_load

        jit_load(ops, cuda=os.environ.get("CROPFORMER_JIT_CUDA", "0") == "1")


def triton_device_or_skip(device: str) -> torch.device:
    """The device a Triton kernel test runs on: "cuda" (compiled; needs TRITON_INTERPRET=0) or "cpu"
    (the interpreter); skips with the reason otherwise."""
    from cropformer.ops._dispatch import triton_interpret, triton_usable

    if device == "cuda":
        dev = cuda_or_skip()
        if triton_interpret():
            pytest.skip("TRITON_INTERPRET=1 would interpret the GPU kernels; rerun with TRITON_INTERPRET=0")
        return dev
    if not triton_usable(torch.device("cpu")):
        pytest.skip("Triton kernels on CPU need TRITON_INTERPRET=1 and triton")
    return torch.device("cpu")


@pytest.fixture(scope="session", autouse=True)
def _selftest_cache(tmp_path_factory):
    """`auto`'s self-test verdicts (cropformer.ops._dispatch.verify) go to a temporary folder, never the
    user's ~/.cache; within the session each runs once (the process remembers it)."""
    os.environ["CROPFORMER_CACHE_DIR"] = str(tmp_path_factory.mktemp("cropformer-cache"))


@contextlib.contextmanager
def nan_filled_empty():
    """Inside, torch.empty / at::empty results are NaN-filled (deterministic mode's fill_uninitialized_memory),
    so a kernel that leaves an output element unwritten fails the comparison instead of passing by luck."""
    import torch.utils.deterministic

    mode, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn_only: nondeterministic ops still run
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def tiny_train_overrides(data: Path, out: Path, *extra: str) -> list[str]:
    """`--set` overrides for a seconds-long run of the "tiny" config on the synthetic set written by
    `make_synthetic_dataset(data / "train", ...)`, with outputs in `out`."""
    return [f"data.train_json=\"{data / 'train' / 'annotations.json'}\"", f"data.train_images=\"{data / 'train' / 'images'}\"",
            "input.min_size_train=[64,96]", "input.min_size_test=96", "loss.num_points=256", "solver.ims_per_batch=2",
            "solver.max_iter=4", "solver.checkpoint_period=2", "data.num_workers=0", f"output_dir=\"{out}\"", *extra]


def spy_device_guard(monkeypatch, kernel_module: str) -> list:
    """Record the device every Triton launcher of `cropformer.kernels.<kernel_module>` enters through
    `cuda_device_guard` (a no-op on CPU, so a CPU test can still see that the launcher asked for the
    tensors' device rather than the current one)."""
    import importlib

    module = importlib.import_module(f"cropformer.kernels.{kernel_module}")
    entered, real = [], module.cuda_device_guard
    monkeypatch.setattr(module, "cuda_device_guard", lambda device: entered.append(device) or real(device))
    return entered
