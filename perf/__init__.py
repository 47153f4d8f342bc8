"""hvshare benchmarks: ``python -m perf <bench> [--quick] [--json PATH]``.

Each benchmark is a module ``perf/<bench>.py`` (the peers KSM and the pipe:
``perf/peers/<bench>.py``) with ``run(quick: bool) -> dict`` (a JSON-able
result with at least ``results``) and ``report(result) -> str`` (the human
table); the suite, its headlines, plots and comparisons are in
``perf/report/``. Timings are medians of repeats and every comparison is a
ratio measured side by side in the same run: these machines are shared and
noisy, so absolute times are context, ratios are the result.
"""
