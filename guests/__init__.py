"""Guests: the process that runs each domain (:mod:`guests.runtime`) and the
workloads that fill and drive its memory (:mod:`guests.workloads`)."""
