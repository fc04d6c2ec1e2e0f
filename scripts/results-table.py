"""The efficacy table of docs/results.md from the reports of scripts/results-models.sh: ACC / ASR (percent) of
each model before and after each method, a column for each model with a report.

    .venv/bin/python scripts/results-table.py [var/results]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METHODS = ("finetune", "nad", "fst", "anp", "ibau", "sau", "auto")


def cell(measure: dict) -> str:
    return f"{measure['acc']:.1f} / {measure['asr']:.1f}"


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "var/results")
    reports = {path.stem: json.loads(path.read_text()) for path in folder.glob("*.json")}
    models = sorted({name.rsplit("-", 1)[0] for name in reports if name.rsplit("-", 1)[-1] in METHODS})
    rows = {"before": {}} | {method: {} for method in METHODS}
    for model in models:
        for method in METHODS:
            report = reports.get(f"{model}-{method}")
            if report is not None:
                rows["before"][model] = cell(report["before"])
                rows[method][model] = cell(report["after"])
    print("| setting | " + " | ".join(models) + " |")
    print("| --- |" + " --- |" * len(models))
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells.get(model, "not run") for model in models) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
