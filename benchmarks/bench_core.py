"""Allocator core benchmark: scenarios a (allocate + dec_ref) and b (churn) of ``run.py``.

Kept so that older instructions still work; the suite is ``benchmarks/run.py``.

Run: python benchmarks/bench_core.py [--quick] [--json out.json] [--reps N]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import main

if __name__ == "__main__":
    sys.exit(main(["--only", "a,b", *sys.argv[1:]]))
