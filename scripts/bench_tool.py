"""The job tool of scripts/bench.py: numbered lines stamped with their print time, flat out or paced.

    python bench_tool.py COUNT SIZE [--rate LINES_PER_S] [--gate SOCKET]

Each line is SIZE bytes, its newline included: `<time.time_ns():019d> <seq:09d> xx…x`, so a
reader's latency is its receive time minus the first field. Lines under 32 bytes have no room
for the time and are `<seq:09d>x…x` (at least 10 bytes). Flat out (no --rate), lines go out
64 KiB at a time, each batch stamped with the time of its write; paced, every line is written
as soon as it is due (several at once when the tool fell behind), stamped when written.

With --gate the tool first connects to the bench's Unix socket and waits (bounded) for its
go, so that every subscriber is connected before the first line. It needs only the standard
library: it runs in the clean environment a service gives its tools.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time

#: the shortest line that holds its print time (19 digits, a space, 9 digits, a space, a pad byte)
STAMPED_MIN_SIZE = 32
UNSTAMPED_MIN_SIZE = 10
#: bytes per write when flat out (a Linux pipe's default capacity)
WRITE_BYTES = 64 * 1024
#: how long the tool waits for the bench's go before it gives up (exit status 3)
GATE_BOUND_S = 120.0


def batch(first: int, stop: int, size: int, stamp_ns: int) -> bytes:
    """Lines `first`..`stop - 1` of `size` bytes, stamped `stamp_ns`, built in bulk."""
    numbers = [b"%09d" % seq for seq in range(first, stop)]
    if size >= STAMPED_MIN_SIZE:
        head = b"%019d " % stamp_ns
        tail = b" " + b"x" * (size - STAMPED_MIN_SIZE + 1) + b"\n"
        return head + (tail + head).join(numbers) + tail
    tail = b"x" * (size - UNSTAMPED_MIN_SIZE) + b"\n"
    return tail.join(numbers) + tail


def write_all(blob: bytes) -> None:
    view = memoryview(blob)
    while view:
        view = view[os.write(1, view) :]


def flat_out(count: int, size: int) -> None:
    per_write = max(1, WRITE_BYTES // size)
    for first in range(0, count, per_write):
        write_all(batch(first, min(first + per_write, count), size, time.time_ns()))


def paced(count: int, size: int, rate: float) -> None:
    """Line i is due at start + i / rate; whatever is due is written at once, then the tool
    sleeps until the next line is due (integer nanoseconds: one wake-up per write)."""
    period_ns = max(1, round(1e9 / rate))
    start = time.monotonic_ns()
    sent = 0
    while sent < count:
        due = min(count, (time.monotonic_ns() - start) // period_ns + 1)
        write_all(batch(sent, due, size, time.time_ns()))
        sent = due
        wait_ns = start + sent * period_ns - time.monotonic_ns()
        if wait_ns > 0 and sent < count:
            time.sleep(wait_ns / 1e9)


def wait_for_gate(path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gate:
        gate.settimeout(GATE_BOUND_S)
        gate.connect(path)
        if gate.recv(1) != b"g":
            raise ConnectionError("the gate closed without a go")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("count", type=int)
    parser.add_argument("size", type=int, help=f"bytes per line with its newline (at least {UNSTAMPED_MIN_SIZE})")
    parser.add_argument("--rate", type=float, default=0.0, help="lines per second (0: flat out)")
    parser.add_argument("--gate", help="a Unix socket to wait on for the go")
    args = parser.parse_args()
    if args.size < UNSTAMPED_MIN_SIZE or args.count < 0 or args.rate < 0:
        parser.error(f"size must be at least {UNSTAMPED_MIN_SIZE}, count and rate not negative")
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # a reader that left ends the tool quietly
    try:
        if args.gate:
            wait_for_gate(args.gate)
    except OSError as exc:
        print(f"bench_tool: no go from {args.gate}: {exc}", file=sys.stderr)
        return 3
    if args.rate:
        paced(args.count, args.size, args.rate)
    else:
        flat_out(args.count, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
