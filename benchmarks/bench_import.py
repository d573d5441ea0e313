"""What importing the Lightning callback costs, beside importing the Lightning package alone.

For each Lightning package (``lightning.pytorch``, ``pytorch_lightning``), each in a fresh interpreter, the best of
``--repeat`` tries (interleaved, so both rows see the same machine):

- baseline: ``import PACKAGE`` alone;
- callback: ``import PACKAGE`` then ``from weavelet_lightning import WeaveletCallback`` (the class loaded);
- both packages: ``import PACKAGE`` then the other one, what the callback used to cost by importing every installed
  Lightning package.

Printed: wall time of the imports (measured inside the interpreter, start-up excluded), the peak resident memory
of the process (``ru_maxrss``), and which Lightning packages ended up loaded. Target: the callback loads only the
package in use. Usage: ``python benchmarks/bench_import.py [--repeat K]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

PACKAGES = ("lightning.pytorch", "pytorch_lightning")

PROBE = """
import json, resource, sys, time
start = time.perf_counter()
{imports}
elapsed = time.perf_counter() - start
loaded = [m for m in {packages!r} if m in sys.modules]
print(json.dumps([elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, loaded]))
"""


def probe(imports: list[str]) -> tuple[float, float, list[str]]:
    script = PROBE.format(imports="\n".join(imports), packages=PACKAGES)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    elapsed, rss_mb, loaded = json.loads(done.stdout.strip().splitlines()[-1])
    return float(elapsed), float(rss_mb), list(loaded)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=5, help="tries of each figure; the best is shown")
    args = parser.parse_args(argv)
    callback = "from weavelet_lightning import WeaveletCallback"
    missed = False
    print(f"importing the Lightning callback, best of {args.repeat} fresh interpreters")
    print(f"{'PACKAGE':<19} {'ROW':<14} {'IMPORT':>9} {'PEAK RSS':>9} {'VS BASELINE':>16}  LOADED")
    for package in PACKAGES:
        other = next(p for p in PACKAGES if p != package)
        rows = {
            "baseline": [f"import {package}"],
            "callback": [f"import {package}", callback],
            "both packages": [f"import {package}", f"import {other}"],
        }
        best: dict[str, tuple[float, float, list[str]]] = {}
        for _ in range(args.repeat):
            for name, imports in rows.items():
                found = probe(imports)
                kept = best.get(name)
                best[name] = found if kept is None else (min(kept[0], found[0]), min(kept[1], found[1]), found[2])
        base_s, base_mb, _ = best["baseline"]
        for name in rows:
            seconds, mb, loaded = best[name]
            extra = "" if name == "baseline" else f"+{(seconds - base_s) * 1000:.0f} ms +{mb - base_mb:.1f} MB"
            print(f"{package:<19} {name:<14} {seconds * 1000:>7.0f} ms {mb:>6.0f} MB {extra:>16}  {', '.join(loaded)}")
        if best["callback"][2] != [package]:
            missed = True
    print(f"target: the callback loads only the package in use: {'MISSED' if missed else 'met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
