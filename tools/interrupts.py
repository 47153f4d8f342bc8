"""Ctrl-C in ``hvctl``: a quiet exit with status 130, wherever it lands.

A command with something to do when interrupted (a child to kill, a
teardown to leave resumable, a sentence to say) runs *armed*
(:func:`armed`): there Ctrl-C raises one KeyboardInterrupt for its
handlers. Anywhere else (loading the command line's modules, parsing,
printing an answer, exiting) there is nothing to do, so Ctrl-C ends the
process at once, printing nothing, with status 130: what a shell reports
for a process ended by SIGINT, so a script's loop over hvctl stops too.

Only the hvctl entry point installs the handler (:func:`install`); this
module imports nothing more, so it can be installed before the rest loads.
"""
from __future__ import annotations

import os
import signal

__all__ = ["INTERRUPTED", "install", "armed"]

#: the exit status of an interrupted hvctl
INTERRUPTED = 128 + signal.SIGINT

_armed = False


def install() -> None:
    """Make Ctrl-C quiet in this process (hvctl's entry point only)."""
    signal.signal(signal.SIGINT, _on_sigint)


def _on_sigint(signum, frame) -> None:
    global _armed
    if _armed:
        _armed = False          # one KeyboardInterrupt: a second Ctrl-C leaves at once
        raise KeyboardInterrupt
    os._exit(INTERRUPTED)


class armed:
    """``with armed():`` Ctrl-C raises KeyboardInterrupt inside (once);
    the state before is restored on the way out. Put it inside the ``try``
    that catches the KeyboardInterrupt."""

    def __enter__(self) -> None:
        global _armed
        self._before, _armed = _armed, True

    def __exit__(self, *exc) -> None:
        global _armed
        _armed = self._before
