"""Fail when a test run skipped tests: a skipped GPU test hides an unbuilt or unusable fast path.

Usage: python scripts/check_skips.py JUNIT_XML [ALLOWED_REASON_REGEX]
Exit 1 when a test was skipped for a reason the regex does not match, or when no test ran at all.
"""
from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET

# Default: tests that need more GPUs than the machine has are the only acceptable skips.
ALLOWED = r"(?i)\b(2|two|second|multiple|several) (cuda )?(gpus|devices)"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    allowed = argv[1] if len(argv) > 1 and argv[1] else ALLOWED
    cases = list(ET.parse(argv[0]).getroot().iter("testcase"))
    skipped = [(f"{c.get('classname')}::{c.get('name')}", s.get("message") or "")
               for c in cases for s in c.iter("skipped")]
    bad = [(name, why) for name, why in skipped if not re.search(allowed, why)]
    print(f"{len(cases)} tests, {len(skipped)} skipped, {len(bad)} of them not allowed")
    for name, why in skipped:
        print(f"{'SKIPPED' if (name, why) in bad else 'allowed skip'} {name}: {why}")
    return 1 if bad or not cases else 0


if __name__ == "__main__":
    sys.exit(main())
