"""The toolstack: the ``hvctl`` command line (:mod:`hvshare.tools.hvctl`) and the
Python API it is built on (:mod:`hvshare.tools.api`)."""
