"""What every ``hvctl`` command shares: argument types, the parser that
reports a mistake in one sentence, domain names, and the text helpers."""
from __future__ import annotations

import argparse
import sys

from .. import api


class Parser(argparse.ArgumentParser):
    """argparse that reports a mistake in one sentence, without the usage dump."""

    def error(self, message: str):
        if message.startswith("argument "):
            message = message[len("argument "):].replace(": ", " ", 1)
        sys.stderr.write(f"{self.prog}: {message} (see '{self.prog} --help').\n")
        sys.exit(2)


def count(what: str, minimum: int = 1):
    """An integer of at least ``minimum`` (hex and octal accepted)."""
    def parse(text: str) -> int:
        try:
            v = int(text, 0)
        except ValueError:
            v = None
        if v is None or v < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
            raise argparse.ArgumentTypeError(f"must be {kind}, not {text!r}")
        return v
    parse.__name__ = what
    return parse


def domain(text: str):
    """A domain as ``xl`` takes one: its domid, or its name (see :func:`resolve`)."""
    if text.isdigit():
        return count("domid")(text)
    if not text or not text.isprintable():
        raise argparse.ArgumentTypeError(f"must be a domid or a domain name, not {ascii(text)}")
    return text


def resolve(a) -> None:
    """Domain names given for domids, turned into domids (ESRCH if none has it).

    Every command names its domain arguments ``domid`` (one) or ``domids``
    (several), so names are resolved here once, before the command runs."""
    refs = ([a.domid] if isinstance(getattr(a, "domid", None), str) else []) + \
        [x for x in getattr(a, "domids", None) or [] if isinstance(x, str)]
    if not refs:
        return
    with api.HypervisorClient(a.socket) as c:
        by_name = {d["name"]: d["domid"] for d in c.list()}
    for ref in refs:
        if ref not in by_name:
            raise api.HVCtlError(f"no domain is called {ref}", 3, "ESRCH")
    if isinstance(getattr(a, "domid", None), str):
        a.domid = by_name[a.domid]
    if getattr(a, "domids", None):
        a.domids = [by_name[x] if isinstance(x, str) else x for x in a.domids]


def rate(text: str) -> float:
    """Pages per second, 0 to 1e6."""
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0 <= v <= 1e6:
        raise argparse.ArgumentTypeError(f"must be a number of pages per second (0 to 1e6), not {text!r}")
    return v


def positive(what: str, hi: float):
    """A number above 0 and at most ``hi``."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = -1.0
        if not 0 < v <= hi:
            raise argparse.ArgumentTypeError(f"must be a number above 0 and at most {hi:g}, not {text!r}")
        return v
    parse.__name__ = what
    return parse


def common() -> argparse.ArgumentParser:
    """``--socket`` and ``--json``, accepted before or after the subcommand."""
    # SUPPRESS: a subcommand's copy must not overwrite the same option given
    # before the subcommand.
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                   help="the hypervisor's control socket (default: see 'hvctl --help')")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print one JSON object (a list for 'list') instead of text")
    return p


def client(a) -> api.HypervisorClient:
    return api.HypervisorClient(a.socket)


def plural(k: int, what: str) -> str:
    return f"{k} {what}" + ("" if k == 1 else "s")


def micros(us: int) -> str:
    """A duration in µs as the shortest readable unit."""
    return f"{us} us" if us < 1000 else f"{us / 1000:g} ms" if us < 10 ** 6 else f"{us / 10 ** 6:g} s"


def table(rows) -> str:
    """Rows of cells as left-aligned columns (the first row is the header)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)
