"""Findings on stdout, warnings on stderr, exit 0."""

import sys

for name in ("README.md", "progress.py", "warnings.py", "fail.py"):
    print(f"checked {name}", flush=True)
    print(f"warning: {name}: line 1: consider a docstring", file=sys.stderr, flush=True)
print("4 files checked, 0 errors, 4 warnings", flush=True)
