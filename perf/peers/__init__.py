"""The peers hvshare's benchmarks measure themselves against, on the same
machine in the same run: Linux KSM (:mod:`hvshare.perf.peers.ksm`, on top of its
sysfs files, :mod:`~perf.peers.ksm_sysfs`, borrowed knobs,
:mod:`~perf.peers.ksm_session`, and the shared page contents,
:mod:`~perf.peers.contents`) and the raw pipe round trip of two Python
processes (:mod:`hvshare.perf.peers.pipe`), hvshare's cost floor.

``python -m hvshare.perf ksm`` and ``python -m hvshare.perf pipe`` run them as benchmarks.
"""
