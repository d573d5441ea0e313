"""Run every benchmark script in this directory (``bench_*.py``: process, training, transports' write path, file
watching, set -> outcome, watchers at scale, runs listing, an idle sidecar, the per-step cost under
``torch.distributed``, instructions per step, imports), one after another.

Usage: ``python benchmarks/run_all.py [NAME ...]`` where NAME filters by substring (``transports``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parent
    scripts = sorted(here.glob("bench_*.py"))
    if argv:
        scripts = [s for s in scripts if any(name in s.stem for name in argv)]
    failed = []
    for script in scripts:
        print(f"\n=== {script.name} ===", flush=True)
        if subprocess.call([sys.executable, str(script)]) != 0:
            failed.append(script.name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
