"""Summarise py-spy's raw (collapsed-stack) profiles: where the time goes, by function and file.

    python scripts/bench_profile.py /tmp/prof/throughput.txt [--top 15]

`scripts/bench.py --profile DIR` writes one such file per scenario (py-spy record --format raw
--nolineno: one line per distinct stack, `frame;frame;...;leaf COUNT`, idle time left out). Self
time is the share of samples a function was the leaf of; total time, the share it was anywhere
on the stack (each function counted once per sample).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

#: a py-spy frame: `function (path/to/file.py)` (line numbers off)
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*)\)$")


def load(path: Path) -> Counter[tuple[str, ...]]:
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def file_of(frame: str) -> str:
    match = _FRAME.match(frame)
    return match["file"] if match else frame


def summarise(stacks: Counter[tuple[str, ...]], top: int) -> str:
    total = sum(stacks.values())
    if not total:
        return "no samples"
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    files: Counter[str] = Counter()
    for stack, count in stacks.items():
        own[stack[-1]] += count
        files[file_of(stack[-1])] += count
        for frame in set(stack):
            anywhere[frame] += count

    def table(title: str, counter: Counter[str]) -> list[str]:
        rows = [f"{title} ({total} samples)"]
        rows += [f"  {100 * count / total:5.1f}%  {name}" for name, count in counter.most_common(top)]
        return rows

    return "\n".join(
        table("self time by function", own)
        + table("total time by function", anywhere)
        + table("self time by file", files)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    for path in args.profiles:
        print(f"== {path}")
        print(summarise(load(path), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
