"""The watchdog that outlives a killed service: `python -m streamsvc.reaper GROUP_FOLDER...`.

The service starts it with a pipe on its stdin and keeps the pipe's other end. When the
service ends, however it ends (even `kill -9`), the pipe closes; the reaper then kills every
process left in the service's job cgroups and removes them, so no job outlives its service.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .sandbox import empty_parent


def main(folders: list[str]) -> int:
    while sys.stdin.buffer.read(4096):
        pass  # nothing is ever sent; EOF is the message
    for folder in folders:
        empty_parent(Path(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
