"""Markdown summary of benchmark records (the JSON lines tests/bench/common.py::record appends), ready to
paste into docs/BENCHMARKS.md: a header with the machine and versions, then one table per op.

Usage: python scripts/bench_summary.py bench_results.jsonl [--env env.txt] [--out summary.md]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STAMP = ("op", "date", "torch", "triton", "device_name")  # the same for every row: in the header


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value).replace("|", "\\|")
    return str(value).replace("|", "\\|")


def summarize(records: list[dict], env: str = "") -> str:
    lines = ["# GPU suite results", ""]
    if env.strip():
        lines += ["```", env.strip(), "```", ""]
    if records:
        stamps = {k: sorted({str(r[k]) for r in records if k in r}) for k in STAMP[1:]}
        lines += [f"{k}: {', '.join(v)}" for k, v in stamps.items() if v] + [""]
    by_op: dict[str, list[dict]] = {}
    for r in records:
        by_op.setdefault(r.get("op", "?"), []).append(r)
    for op, rows in by_op.items():
        columns = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in STAMP]
        lines += [f"## {op}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
        lines.append("")
    if not records:
        lines.append("No benchmark records.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", type=Path)
    parser.add_argument("--env", type=Path, help="a text block for the header (device, driver, versions)")
    parser.add_argument("--out", type=Path, help="write here (default: stdout)")
    args = parser.parse_args(argv)
    records = []
    if args.records.exists():
        for n, line in enumerate(args.records.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    print(f"bench_summary: {args.records}:{n}: not JSON ({exc}); skipped", file=sys.stderr)
    text = summarize(records, args.env.read_text() if args.env and args.env.exists() else "")
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
