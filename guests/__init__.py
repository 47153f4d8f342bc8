"""Guests: the process that runs each domain (:mod:`hvshare.guests.runtime`) and the
workloads that fill and drive its memory (:mod:`hvshare.guests.workloads`)."""
