"""Prints a coloured progress line every 200 ms for 4 seconds, then a summary."""

import sys
import time

STEPS = 20
for step in range(1, STEPS + 1):
    bar = "#" * step + "." * (STEPS - step)
    print(f"\x1b[36m[{bar}]\x1b[0m step {step}/{STEPS}", flush=True)
    time.sleep(0.2)
print("\x1b[32mbuild finished\x1b[0m", flush=True)
sys.exit(0)
