"""Everything about a run's results rather than one benchmark: the whole
suite (:mod:`hvshare.perf.report.suite`, ``python -m hvshare.perf all``), its headline
figures (:mod:`~perf.report.headlines`), the plots
(:mod:`~perf.report.plots`, ``python -m hvshare.perf plots``) and the comparison of
two runs (:mod:`~perf.report.compare`, ``python -m hvshare.perf compare``).
"""
