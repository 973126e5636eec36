"""scripts/gpu_suite.sh on a CPU machine: its control flow (dry run with stubs that fail on demand), its
test selections, and the helpers it calls (skip check, benchmark summary), so that the first GPU run is
not the script's first run."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

SUITE = REPO / "scripts" / "gpu_suite.sh"
STEPS = ["build", "extension", "resources", "parity", "skips", "bench", "summary"]


def run_suite(tmp_path, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "GPU_SUITE_FAIL")}
    full.update(GPU_SUITE_DRY_RUN="1", OUT=str(tmp_path), **env)
    return subprocess.run(["bash", str(SUITE)], cwd=REPO, env=full, capture_output=True, text=True, timeout=300)


def steps_run(stdout: str) -> list[str]:
    return re.findall(r"^== \[\d+ s\] (\w+)$", stdout, flags=re.M)


def test_dry_run_runs_every_step_in_order(tmp_path):
    proc = run_suite(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert steps_run(proc.stdout) == STEPS
    assert "GPU suite passed" in proc.stdout
    # The build is for the one architecture of the GPU (9.0 in a dry run without nvidia-smi), with ptxas
    # reports, and the resource check reads that build's log for that architecture.
    build = (tmp_path / "build.log").read_text()
    arch = re.search(r"TORCH_CUDA_ARCH_LIST=(\d+)\.(\d+) ", build)
    assert arch and "CROPFORMER_PTXAS_VERBOSE=1" in build, build
    resources = (tmp_path / "resources.log").read_text().strip()
    assert re.search(rf"cuda_resources\.py check \S*build\.log --arch {''.join(arch.groups())}$", resources), resources


@pytest.mark.parametrize("failing", STEPS)
def test_a_failing_step_stops_the_suite(tmp_path, failing):
    proc = run_suite(tmp_path, GPU_SUITE_FAIL=failing)
    assert proc.returncode != 0
    assert steps_run(proc.stdout) == STEPS[: STEPS.index(failing) + 1], proc.stdout
    assert f"GPU SUITE FAILED at step '{failing}'" in proc.stdout
    assert "GPU suite passed" not in proc.stdout


def test_build_is_for_the_visible_gpu(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 8.6\n")  # what --query-gpu=compute_cap prints
    (fake / "nvidia-smi").chmod(0o755)
    proc = run_suite(tmp_path, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TORCH_CUDA_ARCH_LIST=8.6" in (tmp_path / "build.log").read_text()
    assert (tmp_path / "resources.log").read_text().strip().endswith("--arch 86")


def test_explicit_arch_list_is_built_and_checked(tmp_path):
    proc = run_suite(tmp_path, TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--arch 80 90" in (tmp_path / "resources.log").read_text()


def _selections() -> dict[str, str]:
    """{step: -m expression} of the suite's two pytest runs."""
    text = SUITE.read_text()
    return {step: re.search(rf"^step {step} .*?-m \"([^\"]+)\"", text, flags=re.M | re.S).group(1)
            for step in ("parity", "bench")}


_COLLECT_PLUGIN = """
import json, os
def pytest_collection_modifyitems(config, items):
    with open(os.environ["MARKERS_OUT"], "w") as f:
        json.dump({i.nodeid: sorted({m.name for m in i.iter_markers()}) for i in items}, f)
"""


@pytest.mark.slow
def test_each_gpu_test_runs_once_and_no_cpu_benchmark_runs(tmp_path):
    """Parity runs every gpu test that is not a benchmark, bench every gpu benchmark: together each gpu
    test exactly once, and no CPU-only benchmark (pytest.ini's `-m "not bench"` is overridden by -m)."""
    (tmp_path / "markers_plugin.py").write_text(_COLLECT_PLUGIN)
    out = tmp_path / "markers.json"
    env = dict(os.environ, MARKERS_OUT=str(out), PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "markers_plugin",
                           "-p", "no:cacheprovider", "-m", "gpu or bench"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    markers = json.loads(out.read_text())

    def selected(expr):  # the -m expressions here use only names, and/or/not: evaluate them as Python
        return {node for node, names in markers.items()
                if eval(expr, {"__builtins__": {}}, {n: n in names for n in re.findall(r"\w+", expr)})}

    sel = _selections()
    parity, bench = selected(sel["parity"]), selected(sel["bench"])
    gpu = {node for node, names in markers.items() if "gpu" in names}
    cpu_bench = {node for node, names in markers.items() if "bench" in names and "gpu" not in names}
    assert parity and bench, sel
    assert not parity & bench, f"run twice: {sorted(parity & bench)[:5]}"
    assert parity | bench == gpu, f"gpu tests never run: {sorted(gpu - parity - bench)[:5]}"
    in_suite_cpu = (parity | bench) & cpu_bench
    assert not in_suite_cpu, f"CPU benchmarks in the GPU suite: {sorted(in_suite_cpu)[:5]}"
    assert all("bench" not in markers[n] for n in parity)


def _junit(tmp_path, skip_messages):
    cases = "".join(f'<testcase classname="t" name="c{i}">' + (f'<skipped message="{m}"/>' if m else "") + "</testcase>"
                    for i, m in enumerate(skip_messages))
    path = tmp_path / "parity.xml"
    path.write_text(f'<testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>')
    return str(path)


@pytest.mark.parametrize("messages, allowed, status", [
    (["", ""], "", 0),
    (["", "no CUDA device"], "", 1),  # a GPU test that skipped on the GPU machine: fail
    (["", "needs 2 GPUs"], "", 0),  # more GPUs than the machine has: the default allows it
    (["", "reference data absent"], "reference data", 0),
    ([], "", 1),  # nothing ran
])
def test_skip_check(tmp_path, messages, allowed, status):
    script = str(REPO / "scripts" / "check_skips.py")
    proc = subprocess.run([sys.executable, script, _junit(tmp_path, messages), allowed], capture_output=True, text=True)
    assert proc.returncode == status, proc.stdout + proc.stderr


def test_bench_summary_is_markdown(tmp_path):
    records = [
        {"op": "ms_deform_attn", "device": "cuda", "mode": "fwd", "ms_p50": 0.123456, "date": "2026-12-02T10:00:00",
         "torch": "2.14.1", "device_name": "NVIDIA H200"},
        {"op": "ms_deform_attn", "device": "cuda", "mode": "fwd+bwd", "ms_p50": 0.5, "date": "2026-12-02T10:00:01",
         "torch": "2.14.1", "device_name": "NVIDIA H200"},
        {"op": "paste", "device": "cuda", "impl": "a|b", "ms_p50": 3.0, "torch": "2.14.1"},
    ]
    jsonl = tmp_path / "bench_results.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")
    env = tmp_path / "env.txt"
    env.write_text("NVIDIA H200, 570.00")
    out = tmp_path / "summary.md"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_summary.py"), str(jsonl), "--env", str(env),
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "not JSON" in proc.stderr
    text = out.read_text()
    assert "NVIDIA H200, 570.00" in text and "device_name: NVIDIA H200" in text
    assert ("## ms_deform_attn\n\n| device | mode | ms_p50 |\n|---|---|---|\n"
            "| cuda | fwd | 0.1235 |\n| cuda | fwd+bwd | 0.5 |") in text
    assert "| cuda | a\\|b | 3 |" in text
