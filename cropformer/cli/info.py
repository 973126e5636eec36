"""`cropformer info` (also `python -m cropformer.info`): versions, the compiled extension's state, and the
backend `auto` picks for each op on each available device and dtype, with the reason.

Self-tests do not run unless `--verify` is given: without it a fast path is reported as picked with
whether its self-test already passed (on disk) or will run at first use.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
from typing import Sequence

from . import UserError, add_common_options

DTYPES = ("float32", "bfloat16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cropformer info", description=__doc__.split("\n\n")[0])
    p.add_argument("--verify", action="store_true",
                   help="run the self-test of every fast path `auto` would pick (as its first use would)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_common_options(p)
    return p


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def collect(verify: bool = False) -> dict:
    """Everything `cropformer info` reports, as plain data."""
    import torch

    from .. import __version__
    from ..allocator import allocator_state
    from ..ops import _dispatch

    ext = _dispatch.compiled_extension()
    extension = {"loaded": ext is not None, "path": getattr(ext, "__file__", None),
                 "problem": _dispatch.extension_problem(), "with_cuda": _dispatch.has_cuda_kernels(),
                 "cuda_archs": [f"sm_{a}" for a in _dispatch.cuda_build_archs() or []] or None,
                 "older_than_sources": _dispatch._newer_sources(ext.__file__) if ext is not None else None}
    devices = [{"device": "cpu", "name": _dispatch._cpu_model()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            devices.append({"device": f"cuda:{i}", "name": torch.cuda.get_device_name(i), "arch": f"sm_{major}{minor}"})
    ops = []
    for op in sorted(_dispatch.PREFERENCES):
        for dev in devices:
            for dtype in DTYPES:
                choice = _dispatch.explain(op, torch.device(dev["device"]), getattr(torch, dtype), run_tests=verify)
                ops.append({"op": op, "device": dev["device"], "dtype": dtype, **choice})
    return {
        "versions": {"cropformer": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "triton": _version("triton"), "numpy": _version("numpy")},
        "extension": extension,
        "verification": {"mode": _dispatch.verify_mode(), "cache_dir": str(_dispatch.cache_dir())},
        "triton_interpret": _dispatch.triton_interpret(),
        "cpu_allocator": allocator_state(),
        "devices": devices,
        "ops": ops,
    }


def _extension_line(ext: dict) -> str:
    if not ext["loaded"]:
        return f"cropformer._C: {ext['problem']}"
    kind = (f"CPU and CUDA kernels (CUDA archs: {', '.join(ext['cuda_archs']) if ext['cuda_archs'] else 'unknown'})"
            if ext["with_cuda"] else "CPU kernels only (built without CUDA)")
    line = f"cropformer._C: loaded from {ext['path']}, {kind}"
    if ext["older_than_sources"]:
        line += f"; OLDER than its source {ext['older_than_sources']}: rebuild it"
    return line


def format_text(info: dict) -> str:
    v = info["versions"]
    lines = [
        f"cropformer {v['cropformer']} | python {v['python']} | torch {v['torch']} (CUDA {v['cuda'] or 'none'}) | "
        f"triton {v['triton'] or 'not installed'} | numpy {v['numpy']}",
        _extension_line(info["extension"]),
        f"self-verification of fast paths: {info['verification']['mode']} (CROPFORMER_VERIFY=on|off|strict), "
        f"verdicts cached in {info['verification']['cache_dir']}",
        f"CPU allocator: {info['cpu_allocator']}",
        "devices: " + "; ".join(f"{d['device']} ({d['name']}{', ' + d['arch'] if 'arch' in d else ''})"
                                for d in info["devices"]),
        "",
        "backend `auto` picks:",
    ]
    for row in info["ops"]:
        lines.append(f"  {row['op']:<24} {row['device']:<7} {row['dtype']:<9} -> {row['backend']:<7} {row['reason']}")
        for c in row["candidates"]:
            lines.append(f"      {c['backend']:<7} {c['status']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from ..ops._dispatch import verify_mode

    args = build_parser().parse_args(argv)
    try:
        mode = verify_mode()
    except ValueError as exc:  # a bad CROPFORMER_VERIFY: one line, exit 2
        raise UserError(str(exc)) from None
    if mode == "off" and args.verify:
        print("note: CROPFORMER_VERIFY=off, so --verify runs nothing", file=sys.stderr)
    info = collect(verify=args.verify)
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0
