"""scripts/results-table.py: the efficacy table of docs/results.md from the reports scripts/results-models.sh
writes, `<model>-<method>.json` with the model's name holding hyphens of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from service_fixtures import ROOT


def _report(before: tuple[float, float], after: tuple[float, float]) -> dict:
    return {"before": {"acc": before[0], "asr": before[1]}, "after": {"acc": after[0], "asr": after[1]}}


def test_results_table_has_a_column_a_model_and_a_row_a_method(tmp_path: Path) -> None:
    for name, report in (("dev-badnets-nad", _report((93.14, 100.0), (89.96, 1.234))),
                         ("dev-badnets-fst", _report((93.14, 100.0), (90.05, 0.96))),
                         ("own-warp-sau", _report((91.5, 99.99), (88.25, 12.0))),
                         ("dev-blend-anp", _report((92.0, 99.8), (85.0, 2.0)))):
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
    (tmp_path / "notes.json").write_text("{}")  # no report: its name ends in no method
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "results-table.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "| setting | dev-badnets | dev-blend | own-warp |\n"
        "| --- | --- | --- | --- |\n"
        "| before | 93.1 / 100.0 | 92.0 / 99.8 | 91.5 / 100.0 |\n"
        "| finetune | not run | not run | not run |\n"
        "| nad | 90.0 / 1.2 | not run | not run |\n"
        "| fst | 90.0 / 1.0 | not run | not run |\n"
        "| anp | not run | 85.0 / 2.0 | not run |\n"
        "| ibau | not run | not run | not run |\n"
        "| sau | not run | not run | 88.2 / 12.0 |\n"
        "| auto | not run | not run | not run |\n"), done.stdout
