"""The hypervisor process: the core behind a control socket and guest pipes.

``python -m hvshare.hvcore.process`` is what ``hvctl start`` runs. The toolstack
finds its files through :mod:`hvshare.hvcore.statedir`.
"""
