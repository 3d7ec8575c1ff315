"""Draw the growth curves of saved bench runs as one SVG (no plotting library needed).

    python scripts/bench.py > run1.txt; ...
    python scripts/bench_plot.py run1.txt run2.txt run3.txt -o docs/growth.svg

Reads the JSON lines of `scripts/bench.py` output (other lines are skipped) and plots the median
over the runs of each growth point, streamsvc against the Node seed (and the pipe ceiling for
line sizes): lines/s against line size, delivered events/s against subscribers, KiB per open
stream against open streams. Both axes are logarithmic.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: (scenario prefix, the figure plotted, panel title, x label, y label)
PANELS = (
    ("growth-size-", "lines_per_s", "throughput against line size", "line size, bytes", "lines/s"),
    ("growth-fanout-", "events_per_s", "fanout against subscribers", "subscribers", "delivered events/s"),
    ("growth-memory-", "kib_per_stream", "memory against open streams", "open streams", "KiB per stream"),
)
#: each target's line colour and dash
STYLES = {"streamsvc": ("#1f6feb", ""), "node": ("#d1242f", ""), "ceiling": ("#6e7781", "6 4")}
PANEL_W, PANEL_H, MARGIN = 340, 260, 64


def medians(paths: Sequence[Path]) -> dict[tuple[str, str], dict[str, float]]:
    """(scenario, target) -> {figure: median over the runs that have it}."""
    seen: dict[tuple[str, str], dict[str, list[float]]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if not line.startswith("{"):
                continue
            result: dict[str, Any] = json.loads(line)
            figures = seen.setdefault((result["scenario"], result["target"]), {})
            for key, value in result.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    figures.setdefault(key, []).append(float(value))
    return {key: {name: statistics.median(values) for name, values in figures.items()} for key, figures in seen.items()}


def series(
    runs: dict[tuple[str, str], dict[str, float]], prefix: str, figure: str
) -> dict[str, list[tuple[float, float]]]:
    """target -> [(x, y)] for the scenarios named `prefix<x>`, by x."""
    found: dict[str, list[tuple[float, float]]] = {}
    for (scenario, target), figures in runs.items():
        if scenario.startswith(prefix) and figure in figures and figures[figure] > 0:
            found.setdefault(target, []).append((float(scenario.removeprefix(prefix)), figures[figure]))
    return {target: sorted(points) for target, points in found.items()}


def panel(left: float, title: str, xlabel: str, ylabel: str, lines: dict[str, list[tuple[float, float]]]) -> str:
    """One log-log panel as SVG elements, its plot area at (left + MARGIN, MARGIN)."""
    xs = [x for points in lines.values() for x, _ in points]
    ys = [y for points in lines.values() for _, y in points]
    x0, x1 = math.floor(math.log10(min(xs))), math.ceil(math.log10(max(xs)))
    y0, y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    ox, oy = left + MARGIN, MARGIN

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            ox + (math.log10(x) - x0) / (x1 - x0) * PANEL_W,
            oy + PANEL_H - (math.log10(y) - y0) / (y1 - y0) * PANEL_H,
        )

    out = [f'<text x="{ox + PANEL_W / 2}" y="{oy - 20}" text-anchor="middle" font-weight="bold">{title}</text>']
    out.append(f'<rect x="{ox}" y="{oy}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#8c959f"/>')
    for power in range(x0, x1 + 1):
        x, _ = at(10**power, 10**y0)
        out.append(f'<line x1="{x:.1f}" y1="{oy}" x2="{x:.1f}" y2="{oy + PANEL_H}" stroke="#eaeef2"/>')
        out.append(f'<text x="{x:.1f}" y="{oy + PANEL_H + 16}" text-anchor="middle">{_power(power)}</text>')
    for power in range(y0, y1 + 1):
        _, y = at(10**x0, 10**power)
        out.append(f'<line x1="{ox}" y1="{y:.1f}" x2="{ox + PANEL_W}" y2="{y:.1f}" stroke="#eaeef2"/>')
        out.append(f'<text x="{ox - 6}" y="{y + 4:.1f}" text-anchor="end">{_power(power)}</text>')
    out.append(f'<text x="{ox + PANEL_W / 2}" y="{oy + PANEL_H + 36}" text-anchor="middle">{xlabel}</text>')
    out.append(
        f'<text x="{ox - 44}" y="{oy + PANEL_H / 2}" text-anchor="middle" '
        f'transform="rotate(-90 {ox - 44} {oy + PANEL_H / 2})">{ylabel}</text>'
    )
    for target, points in lines.items():
        colour, dash = STYLES.get(target, ("#000000", ""))
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (at(*point) for point in points))
        out.append(
            f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}"/>'
        )
        for x, y in (at(*point) for point in points):
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>')
    return "\n".join(out)


def _power(power: int) -> str:
    """10**power, short: 1, 10, 100, 1k, ..., 100M."""
    for unit, exponent in (("M", 6), ("k", 3)):
        if power >= exponent:
            return f"{10 ** (power - exponent)}{unit}"
    return f"{10**power:g}"


def draw(runs: dict[tuple[str, str], dict[str, float]]) -> str:
    width = len(PANELS) * (PANEL_W + 2 * MARGIN)
    height = PANEL_H + 2 * MARGIN + 30
    parts = []
    for index, (prefix, figure, title, xlabel, ylabel) in enumerate(PANELS):
        lines = series(runs, prefix, figure)
        if lines:
            parts.append(panel(index * (PANEL_W + 2 * MARGIN), title, xlabel, ylabel, lines))
    legend = []
    for index, (target, (colour, dash)) in enumerate(STYLES.items()):
        x = MARGIN + index * 140
        legend.append(
            f'<line x1="{x}" y1="{height - 14}" x2="{x + 30}" y2="{height - 14}" stroke="{colour}" '
            f'stroke-width="2" stroke-dasharray="{dash}"/>'
        )
        legend.append(f'<text x="{x + 36}" y="{height - 10}">{target}</text>')
    body = "\n".join(parts + legend)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n'
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="saved output of scripts/bench.py")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the SVG file to write")
    args = parser.parse_args()
    runs = medians(args.runs)
    if not any(scenario.startswith("growth-") for scenario, _ in runs):
        parser.error("no growth results in these files (run scripts/bench.py without --scenario)")
    args.output.write_text(draw(runs))


if __name__ == "__main__":
    main()
