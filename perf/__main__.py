"""Command line of the benchmark suite (see ``perf/__init__.py``).

    python -m hvshare.perf <bench> [--quick] [--json PATH]     one benchmark
    python -m hvshare.perf all [--quick] [--json PATH] [--plots DIR] [--markdown] [--from PATH]
    python -m hvshare.perf compare A.json B.json [--changed] [--threshold F]
    python -m hvshare.perf plots [RUN.json DIR]       (default: docs/perf/run.json docs/perf)
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from .registry import BENCHES, help_text

#: commands that are not benchmarks: name -> module with main(argv)
COMMANDS = {"all": "hvshare.perf.report.suite", "compare": "hvshare.perf.report.compare", "plots": "hvshare.perf.report.plots"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m hvshare.perf", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__ + "\nbenchmarks:\n" + help_text()
        + "\n\ncommands (each has its own --help): " + ", ".join(COMMANDS))
    p.add_argument("bench", help="a benchmark (listed above) or a command")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")
    a = p.parse_args(argv)
    from .common import write_json
    from .load import LoadMeter
    from .report.suite import stamp
    bench = BENCHES.get(a.bench)
    mod = bench.load() if bench else f"no benchmark named {a.bench!r}"
    if isinstance(mod, str):
        print(f"python -m hvshare.perf: {mod} (have: {', '.join(BENCHES)}; commands: {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    meter = LoadMeter()
    t0 = time.perf_counter()
    result = mod.run(quick=a.quick)
    stamp(result, a.bench, a.quick, time.perf_counter() - t0, meter)
    print(mod.report(result))
    if a.json:
        write_json(result, a.json)
        print(f"wrote {a.json}")
    return 0


def _main() -> int:
    try:
        return main()
    except BrokenPipeError:          # `python -m hvshare.perf ... | head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(_main())
