"""scripts/bench_plot.py: the growth curves of saved bench runs, as an SVG."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_plot.py"
SVG = "{http://www.w3.org/2000/svg}"


def run_output(lines_per_s: float) -> str:
    """What scripts/bench.py prints for a growth run: human lines and JSON lines."""
    results = [
        {"scenario": "growth-size-10", "target": "streamsvc", "lines_per_s": lines_per_s},
        {"scenario": "growth-size-100", "target": "streamsvc", "lines_per_s": lines_per_s / 2},
        {"scenario": "growth-size-10", "target": "node", "lines_per_s": 1000},
        {"scenario": "growth-size-100", "target": "node", "lines_per_s": 900},
        {"scenario": "growth-memory-100", "target": "streamsvc", "kib_per_stream": 12.5},
        {"scenario": "growth-memory-1000", "target": "streamsvc", "kib_per_stream": 13.0},
    ]
    return "bench: 2 CPUs\n" + "".join(json.dumps(result) + "\n  a human line\n" for result in results)


def test_the_median_of_the_runs_is_drawn_for_each_target_and_panel(tmp_path: Path) -> None:
    runs = []
    for index, rate in enumerate((100_000, 900_000, 200_000)):  # median: 200,000
        runs.append(tmp_path / f"run{index}.txt")
        runs[-1].write_text(run_output(rate))
    out = tmp_path / "growth.svg"
    subprocess.run([sys.executable, str(SCRIPT), *map(str, runs), "-o", str(out)], check=True)
    svg = ET.parse(out).getroot()
    titles = [text.text for text in svg.iter(f"{SVG}text") if text.get("font-weight") == "bold"]
    assert titles == ["throughput against line size", "memory against open streams"]  # no fanout data: no panel
    lines = svg.findall(f"{SVG}polyline")
    assert [line.get("stroke") for line in lines] == ["#1f6feb", "#d1242f", "#1f6feb"]  # streamsvc, node; streamsvc
    streamsvc = [tuple(map(float, point.split(","))) for point in (lines[0].get("points") or "").split()]
    node = [tuple(map(float, point.split(","))) for point in (lines[1].get("points") or "").split()]
    # a higher rate is drawn higher (a smaller y): streamsvc's median 200,000 at 10 B, then its
    # 100,000 at 100 B, then node's 900; the same line size is the same x
    assert streamsvc[0][1] < streamsvc[1][1] < node[1][1] and streamsvc[0][0] == node[0][0]


def test_files_without_growth_results_are_refused(tmp_path: Path) -> None:
    run = tmp_path / "run.txt"
    run.write_text(json.dumps({"scenario": "latency", "target": "streamsvc", "p99_ms": 5.0}) + "\n")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(run), "-o", str(tmp_path / "g.svg")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "no growth results" in result.stderr
    assert not (tmp_path / "g.svg").exists()
