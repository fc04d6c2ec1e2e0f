"""Time per stage of each engine mode as a stacked horizontal bar chart, in plain SVG (no plotting library).

    .venv/bin/python bench/plot.py bench/results/engine-cpu.json docs/img/engine-cpu.svg
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STAGES = {"load": "#9e9e9e", "teacher": "#4e79a7", "distill": "#f28e2b", "evaluate": "#59a14f"}
WIDTH, BAR, GAP, LEFT, TOP = 640, 28, 18, 90, 40


def svg(results: list[dict], title: str) -> str:
    longest = max(sum(r["stages_s"].values()) for r in results)
    scale = (WIDTH - LEFT - 60) / longest
    height = TOP + len(results) * (BAR + GAP) + 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{LEFT}" y="20" font-size="14">{title}</text>']
    for row, result in enumerate(results):
        y, x = TOP + row * (BAR + GAP), LEFT
        parts.append(f'<text x="{LEFT - 8}" y="{y + BAR / 2 + 4}" text-anchor="end">{result["mode"]}</text>')
        for stage, colour in STAGES.items():
            width = result["stages_s"][stage] * scale
            parts.append(f'<rect x="{x:.1f}" y="{y}" width="{width:.1f}" height="{BAR}" fill="{colour}">'
                         f'<title>{stage}: {result["stages_s"][stage]:.1f} s</title></rect>')
            x += width
        parts.append(f'<text x="{x + 6:.1f}" y="{y + BAR / 2 + 4}">{sum(result["stages_s"].values()):.0f} s</text>')
    legend_y = height - 18
    for i, (stage, colour) in enumerate(STAGES.items()):
        parts.append(f'<rect x="{LEFT + i * 110}" y="{legend_y - 10}" width="12" height="12" fill="{colour}"/>'
                     f'<text x="{LEFT + i * 110 + 16}" y="{legend_y}">{stage}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def main() -> int:
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    data = json.loads(source.read_text())
    machine = data["machine"]
    title = f"WRN-16-1 NAD job, seconds per stage ({machine['device']}, {machine['threads']} threads)"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(svg(data["results"], title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
