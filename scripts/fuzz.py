"""Fuzz the whole HTTP API as tests/test_fuzz.py does, with a bigger budget, and say how much it sent and found.

    .venv/bin/python scripts/fuzz.py [--examples N]

Runs tests/test_fuzz.py under pytest, with N random examples per operation (NAD_FUZZ_EXAMPLES; the schema's
own examples and schemathesis' coverage cases come on top), on the PostgreSQL and Redis the tests use
(NAD_TEST_POSTGRES_URL, NAD_TEST_REDIS_URL). Prints the requests sent per operation and the status codes
they got, the total, and each distinct failure: (operation, what failed, status code). Hypothesis stops
fuzzing an operation at its first failing example (then shrinks it), so a failure hides whatever else that
operation would have shown.
Exits with pytest's status.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=1000, help="random examples per operation (default 1000)")
    args = parser.parse_args()
    os.environ["NAD_FUZZ_EXAMPLES"] = str(args.examples)
    started = time.monotonic()
    status = pytest.main([str(ROOT / "tests" / "test_fuzz.py"), "-q", "-p", "no:cacheprovider"])
    elapsed = time.monotonic() - started
    module = sys.modules.get("test_fuzz")
    if module is None:
        print("tests/test_fuzz.py did not run", file=sys.stderr)
        return int(status) or 1
    sent, failures = module.REQUESTS, module.FAILURES
    if not sent:  # every test skipped: PostgreSQL or Redis unreachable, and pytest calls that a pass
        print("nothing was fuzzed: are PostgreSQL and Redis reachable (NAD_TEST_POSTGRES_URL, NAD_TEST_REDIS_URL)?",
              file=sys.stderr)
        return 1
    print(f"\nfuzzing with {args.examples} random examples per operation:")
    for operation, count in sorted(sent.items()):
        answers = sorted((code, n) for (label, code), n in module.ANSWERS.items() if label == operation)
        print(f"  {count:7d}  {operation:28s}  " + ", ".join(f"{code}: {n}" for code, n in answers))
    print(f"{len(sent)} operations, {sum(sent.values())} requests, {len(failures)} failures, {elapsed:.0f} s")
    for operation, what, code in sorted(failures):
        print(f"  FAILURE {operation}: {what} ({code})")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
