"""The kill controller: destroy a domain to the end, one preemptible step at a time.

Xen's ``domain_kill`` is preemptible: each call relinquishes shared entries
from a saved cursor and returns ``EAGAIN`` when other work is waiting, and
the toolstack calls it again until the domain is gone (docs/semantics.md,
"Teardown"). hvshare's ``destroy`` request is that call: it answers
``done: false`` ("restart") with the teardown's progress -- cursor, pages,
shared entries relinquished so far, state -- and this module asks again
until it answers ``done: true``.

The controller keeps a few requests queued behind the one being served
(:data:`AHEAD`, see :func:`destroy`): the hypervisor never idles waiting
for the controller, and the controller reads the answers that arrived
together in one go.

Because the cursor lives in the hypervisor, a controller that dies mid-way
(SIGKILL, Ctrl-C) loses nothing: the domain stays ``dying`` with its cursor
(``hvctl list`` shows it) and the next ``destroy`` resumes there.

The result is the ``destroy`` object of ``hvctl destroy --json``: ``domid``,
``seconds`` (this controller's wall time), ``entries`` (shared entries the
teardown relinquished), ``continuations`` (restarts the teardown answered,
including those of an earlier, interrupted controller) and ``max_pause_ms``
(the hypervisor's longest teardown step, wall time), plus ``steps``,
``resumed``, ``pages``, ``hv_seconds`` (the hypervisor's time in teardown
steps) and ``max_pause_cpu_ms`` (the longest step in CPU time: what is left
of ``max_pause_ms`` once other processes' share of the CPU is taken out).
"""
from __future__ import annotations

import importlib.util
import sys
import time
from typing import Callable

from hvshare.hvcore.wire import control
from hvshare.hvcore import errors
from hvshare.hvcore.errors import ESRCH

from .errors import HVCtlError, NoHypervisor, check_answer

__all__ = ["destroy", "terminal_progress", "result_of"]


#: destroy requests kept queued behind the one the hypervisor is serving
AHEAD = 3


def destroy(client, domid: int, progress: Callable[[dict], None] | None = None) -> dict:
    """Call destroy for ``domid`` on the hypervisor of ``client`` (a
    :class:`hvshare.tools.client.HypervisorClient`) while it answers "restart"; return
    the teardown's summary.

    ``progress(answer)`` is called after every step. An unknown or
    already-destroyed domain raises :class:`hvshare.tools.errors.HVCtlError` (ESRCH)
    before anything is done.

    The first request goes alone and gets the full answer; after it,
    :data:`AHEAD` more requests are kept queued on a connection of the
    controller's own (topped up in one write), so the hypervisor finds the
    next step waiting when it finishes one instead of idling for a round
    trip (on a busy machine, for the controller to be scheduled). Those
    are ``brief``: a restart carries only what changes between steps, and
    ``progress`` gets it merged into the answer before (the final answer
    is complete). The step that ends the teardown leaves
    those extra requests to fail with "already destroyed", which is
    expected and ignored. Others wait at most one chunk longer for it: a
    step yields after its chunk when a guest or another client is waiting,
    and the hypervisor serves them before this connection's next request.
    """
    t0 = time.perf_counter()
    sock = client.open_connection(wait=True)
    first = b"".join(bytes(x) for x in control.frame({"op": "destroy", "domid": domid}))
    request = b"".join(bytes(x) for x in control.frame({"op": "destroy", "domid": domid, "brief": True}))
    answers = control.FrameReader(sock)
    inflight = 0

    def answer() -> dict:
        nonlocal inflight
        try:
            got = answers.next()
        except (ConnectionError, OSError, errors.ProtocolError):
            got = None
        if got is None:
            inflight = 0                 # nothing more will come
            raise NoHypervisor(f"the hypervisor on {client.socket_path} closed the connection during destroy")
        inflight -= 1
        return check_answer(got[0], "destroy")

    def send(k: int) -> None:
        nonlocal inflight
        if k > 0:
            sock.sendall(request * k)
            inflight += k

    try:
        sock.sendall(first)
        inflight = 1
        last = answer()
        resumed = last["resumed"]
        while True:
            if progress is not None:
                progress(last)
            if last["done"]:
                break
            send(1 + AHEAD - inflight)
            try:
                # a brief restart: only what changed since the last answer
                a = answer()
                last = a if a["done"] else dict(last, **a)
            except HVCtlError as e:
                if e.code != ESRCH:
                    raise
                # Another controller finished this teardown between two steps;
                # the counts are those of the last step this one saw.
                last = dict(last, done=True, state="destroyed", finished_elsewhere=True)
                break
        while inflight:                  # the extra requests: "already destroyed"
            try:
                answer()
            except HVCtlError:
                pass
    finally:
        sock.close()
        close = getattr(progress, "close", None)
        if close is not None:
            close()
    last["resumed"] = resumed
    return result_of(last, time.perf_counter() - t0)


def result_of(answer: dict, seconds: float) -> dict:
    """The controller's summary from the last step's answer."""
    out = {"domid": answer["domid"], "seconds": round(seconds, 6), "entries": answer["entries"],
           "continuations": answer["continuations"], "max_pause_ms": answer["max_pause_ms"],
           "max_pause_cpu_ms": answer["max_pause_cpu_ms"],
           "steps": answer["steps"], "resumed": answer["resumed"], "pages": answer["npages"],
           "hv_seconds": answer["hv_seconds"]}
    if answer.get("finished_elsewhere"):
        out["finished_elsewhere"] = True
    return out


class _Bar:
    """A tqdm bar of shared entries relinquished, opened on the first step."""

    def __init__(self, stream):
        self.stream = stream
        self.bar = None

    def __call__(self, a: dict) -> None:
        if self.bar is None:
            from tqdm import tqdm
            # delay: a teardown over in a blink prints nothing
            self.bar = tqdm(total=max(a["entries_total"], a["entries"]), initial=0,
                            desc=f"destroy dom{a['domid']}", unit="entry", unit_scale=True,
                            file=self.stream, delay=0.3, leave=False, dynamic_ncols=True)
        self.bar.set_postfix_str(f"{a['phase']}, gfn {a['cursor']:,}/{a['npages']:,}, "
                                 f"{a['continuations']:,} restarts", refresh=False)
        self.bar.update(a["entries"] - self.bar.n)
        if a["done"]:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def terminal_progress(stream=None) -> Callable[[dict], None] | None:
    """A progress bar on ``stream`` (stderr) if it is a terminal, else None.

    The bar is tqdm's; without tqdm installed there is no bar (the
    teardown itself does not depend on it).
    """
    stream = stream or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return None
    if importlib.util.find_spec("tqdm") is None:
        return None
    return _Bar(stream)
