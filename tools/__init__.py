"""The toolstack: the ``hvctl`` command line (:mod:`tools.hvctl`) and the
Python API it is built on (:mod:`tools.api`)."""
