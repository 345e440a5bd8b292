"""Event-loop lag while the file releases, commits and scans: the ``lag`` scenarios of
``run.py``.

Kept so that older instructions still work; the suite is ``benchmarks/run.py``.

Run: python benchmarks/bench_loop_lag.py [--quick] [--json out.json] [--reps N]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import main

if __name__ == "__main__":
    sys.exit(main(["--only", "lag", *sys.argv[1:]]))
