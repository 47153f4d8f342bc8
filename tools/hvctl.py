"""``hvctl``: the entry point of hvshare's command line (see :mod:`hvshare.tools.cli`).

Ctrl-C ends hvctl quietly with status 130 wherever it lands
(:mod:`hvshare.tools.interrupts`), also while the command line's modules load, a
good part of a short command's life: so the handler goes in before they
are imported.
"""
import sys

from hvshare.tools import interrupts

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run one ``hvctl`` command (``argv``, default the process's); its exit status."""
    interrupts.install()
    from hvshare.tools.cli import main as run
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
