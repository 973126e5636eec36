"""Packaging: what a wheel installs, the console command, and no name clash at top level.

The wheel is built from a copy of the tracked files (without the compiled extension: CROPFORMER_BUILD_EXT=0),
so the test sees exactly what `pip install .` would ship and leaves the checkout untouched.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> list[str]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to list the tracked files")
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        dst = src / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_symlink():
            dst.symlink_to(os.readlink(REPO / name))
        elif (REPO / name).is_file():
            shutil.copy2(REPO / name, dst)
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "CROPFORMER_BUILD_EXT": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                          str(src)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = out.glob("cropformer-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def test_wheel_installs_only_the_cropformer_package(wheel_names):
    top = {n.split("/")[0] for n in wheel_names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"cropformer"}, top
    # The Triton kernels ship inside our namespace (a top-level `kernels` would clash with HF's package).
    for op in ("ms_deform_attn", "masked_attention", "point_mask", "paste"):
        assert f"cropformer/kernels/{op}.py" in wheel_names
    assert "cropformer/configs/tiny_demo.json" in wheel_names  # configs by name work outside a checkout


def test_console_entry_point_declared():
    import importlib.metadata as md

    eps = [ep for ep in md.entry_points(group="console_scripts") if ep.name == "cropformer"]
    assert eps and eps[0].value == "cropformer.cli:main"


def test_cropformer_command_runs_from_any_folder(tmp_path):
    res = subprocess.run([sys.executable, "-m", "cropformer", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0 and "infer" in res.stdout and "export" in res.stdout
    bad = subprocess.run([sys.executable, "-m", "cropformer", "frobnicate"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr


def test_a_top_level_kernels_package_does_not_shadow_ours(tmp_path):
    # Simulate HuggingFace's `kernels` (a top-level package of that name) first on the path.
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('the other kernels package')\n")
    code = "import cropformer.kernels.paste, cropformer.kernels.masked_attention, cropformer.ops; print('ok')"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def _python_files() -> list[Path]:
    return [p for p in (REPO / "cropformer").rglob("*.py") if "kernels" not in p.relative_to(REPO / "cropformer").parts]


def test_no_import_of_a_top_level_kernels_module():
    offenders = []
    for path in [*_python_files(), *(REPO / "kernels").glob("*.py"), *(REPO / "tests").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "kernels":
                offenders.append(f"{path}:{node.lineno}")
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "kernels" for a in node.names):
                offenders.append(f"{path}:{node.lineno}")
    assert not offenders, offenders


def test_library_modules_hold_no_main():
    """The command-line layer lives in cropformer/cli; library modules hold no `main()`."""
    offenders = []
    for path in _python_files():
        if "cli" in path.relative_to(REPO / "cropformer").parts:
            continue
        tree = ast.parse(path.read_text(), str(path))
        offenders += [f"{path}:{n.lineno}" for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert not offenders, offenders
