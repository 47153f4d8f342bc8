"""``hvctl``: the command line of hvshare's toolstack.

Each subcommand is a thin layer over :mod:`hvshare.tools.api`: parse and check the
arguments, make one or a few requests on the control socket, print a short
human answer or, with ``--json``, one JSON document (an object, an array of
domains for ``list``; streams print one object per line) whose keys are the
contract of the README and docs/schema/, its floats rounded by one rule
(:func:`hvshare.tools.cli.args.rounded`). Every failure is one sentence on stderr
and a non-zero exit status (:data:`EXIT_STATUSES`).

One module per group of commands (:data:`MODULES`); each has
``register(add)``, where ``add(name, help, description, run)`` returns the
subcommand's parser and ``run(a)`` returns None (it printed its own
output), ``(obj, text)`` or ``(obj, text, status)``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import textwrap

from .. import api
from ..interrupts import INTERRUPTED, armed
from .args import Parser, common, dumps, resolve

#: the command modules, in the order ``hvctl --help`` lists their commands
MODULES = ("lifecycle", "domains", "fork", "counters", "sharing", "dedup", "top", "events", "demo")

#: the exit status of an output pipe closed early (``hvctl events | head -1``),
#: what a shell reports for a process killed by SIGPIPE
BROKEN_PIPE = 128 + signal.SIGPIPE

EXIT_STATUSES = (
    (0, "done"),
    (1, "the operation failed (one sentence on stderr), an audit found errors, or the "
        "hypervisor went away under a stream (events, dedup --watch)"),
    (2, "a mistake on the command line"),
    (INTERRUPTED, "interrupted (Ctrl-C), also a stream (events, top, dedup --watch, start "
                  "--foreground) that Ctrl-C ends"),
    (BROKEN_PIPE, "the output pipe was closed early, as 'hvctl events | head -1' does "
                  "(nothing is printed)"),
)

EPILOG = """\
The hypervisor is one process serving a Unix control socket; each domain's
guest is a process of its own that maps the frame pool read-only and writes
through its pipe to the hypervisor (a write to a shared page is a CoW fault).

Socket: --socket PATH, else $HVSHARE_SOCKET, else
$XDG_RUNTIME_DIR/hvshare/hvshare.sock, else /tmp/hvshare-UID/hvshare.sock.
--socket and --json work before or after the subcommand.

Examples:
  hvctl start --frames 65536
  hvctl create --pages 4096 --workload clone --seed 1
  hvctl create --pages 4096 --workload clone --seed 1
  hvctl dedup           # share their identical pages (--watch: keep doing so)
  hvctl list
  hvctl info --json
  hvctl stop
  hvctl demo            # everything above, on a private hypervisor
"""

EPILOG += "\nExit status:\n" + "".join(
    textwrap.fill(what, 78, initial_indent=f"  {code:<5}", subsequent_indent=" " * 7) + "\n"
    for code, what in EXIT_STATUSES) + """
Shell completion (with the argcomplete package installed):
  eval "$(register-python-argcomplete hvctl)"
"""


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("hvshare")
    except Exception:                   # run from a source tree that is not installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    shared = common()
    p = Parser(prog="hvctl", parents=[shared], epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Control an hvshare hypervisor: an emulation of Xen's memory sharing "
                           "with real processes and real shared memory.")
    p.add_argument("--version", action="version", version=f"hvctl (hvshare) {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    def add(name: str, help: str, description: str, run) -> argparse.ArgumentParser:
        s = sub.add_parser(name, parents=[shared], help=help, description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        s.set_defaults(run=run)
        return s

    for name in MODULES:
        importlib.import_module(f"{__name__}.{name}").register(add)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status. Output to a closed pipe ends it
    quietly with :data:`BROKEN_PIPE` (socket errors never get here: the
    client turns them into :class:`api.HVCtlError`)."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()          # here, not at exit, so a closed pipe is caught
    except BrokenPipeError:
        # the interpreter flushes stdout once more at exit: make that quiet too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE


def _complete(parser: argparse.ArgumentParser) -> None:
    """Answer a shell's completion request (``_ARGCOMPLETE`` in the
    environment) when argcomplete is installed; nothing otherwise."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    _complete(parser)
    a = parser.parse_args(argv)
    a.socket = getattr(a, "socket", None)
    a.json = getattr(a, "json", False)
    try:
        with armed():               # the command's handlers see Ctrl-C (tools.interrupts)
            resolve(a)
            result = a.run(a)
    except api.HVCtlError as e:
        msg = str(e).rstrip(".")
        if isinstance(e, api.NoHypervisor) and a.command != "start":
            msg += " (start one with 'hvctl start')"
        print(f"hvctl {a.command}: {msg}.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        more = (f"; domain {a.domid} may be left dying: run 'hvctl destroy {a.domid}' again to finish"
                if a.command == "destroy" else
                "; the hypervisor still finishes the create ('hvctl list' shows it)"
                if a.command == "create" else "")
        print(f"hvctl {a.command}: interrupted{more}.", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:             # our output's reader left: see main
        raise
    except OSError as e:                # a path we cannot create or reach
        where = f"cannot use {e.filename}: " if e.filename else ""
        print(f"hvctl {a.command}: {where}{e.strerror or e}.", file=sys.stderr)
        return 1
    if result is None:
        return 0
    obj, text, *status = result
    if text is not None:            # None: the command printed its own output
        print(dumps(obj, line=a.command == "list") if a.json else text)
    return status[0] if status else 0
