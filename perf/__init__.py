"""hvshare benchmarks: ``python -m hvshare.perf <bench> [--quick] [--json PATH]``.

Every benchmark is listed once, in :mod:`hvshare.perf.registry` (``python -m hvshare.perf
--help``): a module with ``run(quick: bool) -> dict`` and ``report(result)
-> str``. What a bench measures it reports as :class:`hvshare.perf.figure.Figure` s
(every repeat, median, spread) in its result's ``figures``, the contract
the headlines, plots and comparisons (``perf/report/``) read; the goals
they are judged by are one table, :mod:`hvshare.perf.goals`. Every comparison is a
ratio of medians measured side by side in the same run: these machines are
shared and noisy, so absolute times are context, ratios are the result.
"""
