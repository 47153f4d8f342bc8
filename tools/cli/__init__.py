"""``hvctl``: the command line of hvshare's toolstack.

Each subcommand is a thin layer over :mod:`tools.api`: parse and check the
arguments, make one or a few requests on the control socket, print a short
human answer or, with ``--json``, one JSON object (a list for ``list``) whose
keys are the contract of the README. Every failure is one sentence on
stderr and a non-zero exit status: 1 for a failed operation (and for an
audit that found errors), 2 for a mistake on the command line.

One module per group of commands (:data:`MODULES`); each has
``register(add)``, where ``add(name, help, description, run)`` returns the
subcommand's parser and ``run(a)`` returns None (it printed its own
output), ``(obj, text)`` or ``(obj, text, status)``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from .. import api
from .args import Parser, common, resolve

#: the command modules, in the order ``hvctl --help`` lists their commands
MODULES = ("lifecycle", "domains", "counters", "sharing", "dedup", "top", "events", "demo")

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
    a = build_parser().parse_args(argv)
    a.socket = getattr(a, "socket", None)
    a.json = getattr(a, "json", False)
    try:
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
        return 130
    except OSError as e:                # a path we cannot create or reach
        where = f"cannot use {e.filename}: " if e.filename else ""
        print(f"hvctl {a.command}: {where}{e.strerror or e}.", file=sys.stderr)
        return 1
    if result is None:
        return 0
    obj, text, *status = result
    if text is not None:            # None: the command printed its own output
        print(json.dumps(obj, indent=None if a.command == "list" else 2) if a.json else text)
    return status[0] if status else 0
