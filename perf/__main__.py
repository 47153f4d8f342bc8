"""Command line of the benchmark suite (see ``perf/__init__.py``)."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from .common import machine_info

BENCHES = ("rmap", "cow", "teardown", "dedup", "density", "ksm", "pipe")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf", description=__doc__)
    p.add_argument("bench", help="benchmark to run: " + ", ".join(BENCHES))
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")
    a = p.parse_args(argv)
    try:
        mod = importlib.import_module(f"perf.{a.bench}")
    except ModuleNotFoundError:
        print(f"python -m perf: no benchmark named {a.bench!r} (have: {', '.join(BENCHES)})", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    result = mod.run(quick=a.quick)
    result.setdefault("bench", a.bench)
    result.setdefault("quick", a.quick)
    result["machine"] = machine_info()
    result["wall_seconds"] = round(time.perf_counter() - t0, 3)
    print(mod.report(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
