"""`cropformer info` / `python -m cropformer.info`: versions, the extension's state, and the backend `auto`
picks for every op on every device and dtype, without running self-tests unless --verify."""
import json
import subprocess
import sys

import pytest

from cropformer.cli import info
from cropformer.ops import _dispatch


@pytest.fixture
def no_verdicts(monkeypatch, tmp_path):
    monkeypatch.setattr(_dispatch, "_verdicts", {})
    monkeypatch.setenv("CROPFORMER_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CROPFORMER_VERIFY", raising=False)


def test_module_entry_point_mentions_every_op():
    proc = subprocess.run([sys.executable, "-m", "cropformer.info"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for op in ("ms_deform_attn", "masked_cross_attention", *_dispatch.PREFERENCES):
        assert op in proc.stdout
    for word in ("torch", "triton", "numpy", "python", "cropformer._C", "backend `auto` picks"):
        assert word in proc.stdout


def test_json_without_running_selftests(no_verdicts, monkeypatch, capsys):
    def must_not_run(*args):
        raise AssertionError("a self-test ran without --verify")

    monkeypatch.setattr(_dispatch, "run_selftest", must_not_run)
    assert info.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["versions"]) == {"cropformer", "python", "torch", "cuda", "triton", "numpy"}
    ext = report["extension"]
    assert ext["loaded"] == (_dispatch.compiled_extension() is not None)
    assert ext["loaded"] or ext["problem"]  # why not, when it is not loaded
    rows = {(r["op"], r["device"], r["dtype"]): r for r in report["ops"]}
    for op in _dispatch.PREFERENCES:
        for dtype in ("float32", "bfloat16"):
            row = rows[(op, "cpu", dtype)]
            assert row["backend"] in ("torch", "cpu") and row["reason"]
            assert [c["backend"] for c in row["candidates"]] == [name for name, _, _ in _dispatch.PREFERENCES[op]]
    triton = rows[("ms_deform_attn", "cpu", "float32")]["candidates"][1]
    assert triton == {"backend": "triton", "status": "skipped: auto never picks the Triton interpreter"}
    assert not _dispatch._verdicts


def test_verify_runs_the_selftests(no_verdicts, monkeypatch, capsys):
    def failing(backend, device, dtype):
        raise AssertionError("out is off by 1")

    monkeypatch.setitem(_dispatch.SELFTESTS, "masked_cross_attention", failing)
    assert info.main(["--verify"]) == 0
    out = capsys.readouterr().out
    assert "failed self-test: AssertionError: out is off by 1" in out
    assert ("masked_cross_attention", "cpu", "cpu", _dispatch.torch.float32) in _dispatch._verdicts
    monkeypatch.setenv("CROPFORMER_VERIFY", "strict")  # reported, not raised
    assert info.main(["--verify"]) == 0
    assert "failed self-test: masked_cross_attention: the cpu backend failed" in capsys.readouterr().out


def test_console_command_lists_info():
    from cropformer.cli import COMMANDS

    assert "info" in COMMANDS
    assert info.build_parser().parse_args(["--verify", "--json"]).verify


def test_bad_verify_switch_is_one_line(monkeypatch, capsys):
    from cropformer.cli import run

    monkeypatch.setenv("CROPFORMER_VERIFY", "maybe")
    assert run(info.main, []) == 2
    assert capsys.readouterr().err.strip() == "error: CROPFORMER_VERIFY='maybe': expected one of on, off, strict"
