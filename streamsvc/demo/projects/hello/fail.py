"""A verifier that finds a problem: prints what it checked, then fails with status 3."""

import sys

print("verifying hello ...", flush=True)
print("error: assertion 'answer == 42' does not hold (answer = 41)", file=sys.stderr, flush=True)
sys.exit(3)
