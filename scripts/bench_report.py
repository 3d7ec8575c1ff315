"""What scripts/bench.py reports: a result per scenario and target, its fractions of the
scenario's ceiling, a human line, and the markdown tables at the end."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: the figures of each kind of scenario that its table rows show: (key, label, higher is better)
HEADLINES: dict[str, list[tuple[str, str, bool]]] = {
    "throughput": [
        ("lines_per_s", "lines/s", True),
        ("mb_per_s", "MB/s", True),
        ("service_cpu_us_per_event", "service CPU µs/line", False),
    ],
    "latency": [
        ("p50_ms", "p50 ms", False),
        ("p99_ms", "p99 ms", False),
        ("max_ms", "max ms", False),
        ("service_cpu_us_per_event", "service CPU µs/line", False),
    ],
    "fanout": [
        ("events_per_s", "events/s", True),
        ("p99_ms", "p99 ms", False),
        ("whole", "subs with all", True),
        ("service_cpu_us_per_event", "service CPU µs/event", False),
    ],
    "jobrate": [
        ("jobs_per_s", "jobs/s", True),
        ("p50_ms", "p50 ms", False),
        ("p99_ms", "p99 ms", False),
        ("lost", "lost", False),
        ("service_cpu_ms_per_job", "service CPU ms/job", False),
        ("client_cpu_ms_per_job", "client CPU ms/job", False),
        ("tools_cpu_ms_per_job", "tools CPU ms/job", False),
        ("machine_cpu_ms_per_job", "machine CPU ms/job", False),
    ],
    "idle": [("kib_per_stream", "KiB/stream", False)],
}
#: the kind of each growth curve's points (`growth-size-100` is a throughput)
GROWTH_KINDS = {"growth-size": "throughput", "growth-fanout": "fanout", "growth-memory": "idle"}


@dataclass
class Result:
    scenario: str
    #: "streamsvc", "node" or "ceiling"
    target: str
    metrics: dict[str, Any]
    problems: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        curve = self.scenario.rpartition("-")[0]
        return GROWTH_KINDS.get(curve, self.scenario)

    def fractions(self, ceiling: Result | None) -> dict[str, float]:
        """Each headline figure as a fraction of the ceiling's: rate / ceiling, or ceiling
        latency / latency (1 is as good as the machine allows)."""
        if ceiling is None:
            return {}
        found = {}
        for key, _, higher in HEADLINES.get(self.kind, []):
            ours, best = self.metrics.get(key), ceiling.metrics.get(key)
            if isinstance(ours, int | float) and isinstance(best, int | float) and ours and best:
                found[key] = round(ours / best if higher else best / ours, 3)
        return found

    def json_line(self, ceiling: Result | None) -> dict[str, Any]:
        line = {"scenario": self.scenario, "target": self.target, **self.metrics}
        if self.target != "ceiling":
            line |= {"fraction_of_ceiling": self.fractions(ceiling), "ok": not self.problems, "problems": self.problems}
        return line

    def summary(self) -> str:
        shown = [
            f"{label} {number(self.metrics[key])}"
            for key, label, _ in HEADLINES.get(self.kind, [])
            if self.metrics.get(key) is not None
        ]
        notes = "; ".join(self.problems) if self.problems else "nothing lost"
        if self.target == "ceiling":
            notes = str(self.metrics.get("what", ""))
        return f"  {self.scenario:20} {self.target:9} {', '.join(shown):48} {notes}"


def number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def ms(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def tables(results: Sequence[Result], ceilings: Mapping[str, Result]) -> str:
    """Markdown: the scenarios, then each growth curve: every headline figure of each target
    beside its ceiling and the fractions of it."""
    scenarios = list(dict.fromkeys(r.scenario for r in results if r.target != "ceiling"))
    sections = {"scenarios": [name for name in scenarios if not name.startswith("growth-")]}
    for curve in GROWTH_KINDS:
        sections[curve] = [name for name in scenarios if name.startswith(curve + "-")]
    return "\n\n".join(f"{title}\n\n{_table(results, ceilings, names)}" for title, names in sections.items() if names)


def _table(results: Sequence[Result], ceilings: Mapping[str, Result], scenarios: list[str]) -> str:
    rows = [
        "| scenario | figure | streamsvc | node | ceiling | streamsvc / ceiling | node / ceiling |",
        "|" + " --- |" * 7,
    ]
    by_key = {(r.scenario, r.target): r for r in results}
    for scenario in scenarios:
        ceiling = ceilings.get(scenario)
        ours, peer = by_key.get((scenario, "streamsvc")), by_key.get((scenario, "node"))
        kind = (ours or peer or Result(scenario, "", {})).kind
        for key, label, _ in HEADLINES.get(kind, []):
            cells = [_cell(result, key) for result in (ours, peer, ceiling)]
            fractions = [str(r.fractions(ceiling).get(key, "")) if r else "" for r in (ours, peer)]
            rows.append(f"| {scenario} | {label} | " + " | ".join(cells + fractions) + " |")
    return "\n".join(rows)


def _cell(result: Result | None, key: str) -> str:
    if result is None or result.metrics.get(key) is None:
        return ""
    return number(result.metrics[key]) + (" (lost)" if result.problems and result.target != "ceiling" else "")


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    return f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, {platform.platform()}"
