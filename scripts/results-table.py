"""The efficacy table of docs/results.md from the reports of scripts/results-dev.sh: ACC / ASR (percent) of
each dev model before and after each method.

    .venv/bin/python scripts/results-table.py [var/results-dev]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MODELS = ("badnets", "blend", "sig", "patch")
METHODS = ("finetune", "nad", "fst", "anp", "ibau", "auto")


def cell(measure: dict) -> str:
    return f"{measure['acc']:.1f} / {measure['asr']:.1f}"


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "var/results-dev")
    reports = {path.stem: json.loads(path.read_text()) for path in folder.glob("*.json")}
    rows = {"before": {}} | {method: {} for method in METHODS}
    for model in MODELS:
        for method in METHODS:
            report = reports.get(f"{model}-{method}")
            if report is not None:
                rows["before"][model] = cell(report["before"])
                rows[method][model] = cell(report["after"])
    print("| setting | " + " | ".join(MODELS) + " |")
    print("| --- |" + " --- |" * len(MODELS))
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells.get(model, "not run") for model in MODELS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
