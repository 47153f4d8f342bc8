"""Clients: the toolstack's connections on the control socket.

:class:`Clients` accepts connections, reads their framed requests, checks
each (identical small requests -- the kill controller sends one destroy
request thousands of times -- are parsed and checked once and
remembered) and hands it to the op table (:mod:`.control`), one request
per step. It keeps a client's order: a client waiting for a deferred
answer (a create, a job) is not served further until answered
(:meth:`Clients.answer`), and a client whose step yielded to other work,
or that arrives while control requests are paced, is *deferred*: the loop
serves it after the work it found ready. A client that leaves more than
:data:`CONTROL_MAX_QUEUE` bytes of answers unread is not read (nor served)
until it has read them down to that.
"""
from __future__ import annotations

import selectors
import socket
from typing import Callable

from ..wire import control, schema
from .. import errors
from .endpoints import ControlConnection
from .steps import Budget, StepMeter

#: frames without payload whose checked request is remembered (see
#: Clients.check), and the longest such frame
KNOWN_FRAMES = 64
KNOWN_BYTES = 256
#: bytes of answers a client may leave unread before its requests stop
#: being read (until it reads them down to this): a client that pipelines
#: and never reads would otherwise pile its answers up in our memory
CONTROL_MAX_QUEUE = 1 << 20


class Clients:
    """The control connections: reading, checking, ordering and answering.

    Depends on the loop's selector, the step meter (each request is a
    metered step), the budget (a step that yielded defers its client) and
    ``serve``, the op table's ``serve(c, op, args, payload)``, bound once
    the op table exists (:meth:`bind`): the op table answers through the
    clients, the clients serve through the op table.
    """

    def __init__(self, sel, meter: StepMeter, budget: Budget):
        self.sel, self.meter, self.budget = sel, meter, budget
        self.conns: set[ControlConnection] = set()
        self.serve: Callable | None = None
        #: control requests wait: paced until the window ends (see .pacing)
        self.paced = False
        #: the loop is serving (a stop ends every client's backlog)
        self.running = False
        #: clients whose next requests wait until other ready work is served
        self.deferred: list[ControlConnection] = []
        self._deferred_set: set[ControlConnection] = set()     # the same, as a set
        #: checked requests by frame (see check), at most KNOWN_FRAMES
        self.known: dict[bytes, tuple] = {}

    def bind(self, serve: Callable) -> None:
        self.serve = serve

    # -- the endpoints' host ---------------------------------------------
    def want_write(self, c: ControlConnection, on: bool) -> None:
        if not on and c.read_paused:
            self._resume_reading(c)
            return
        ev = (0 if c.read_paused else selectors.EVENT_READ) | (selectors.EVENT_WRITE if on else 0)
        self.sel.modify(c.sock, ev, self._event(c))

    def _pause_reading(self, c: ControlConnection) -> None:
        """Stop reading ``c`` while over :data:`CONTROL_MAX_QUEUE` bytes of
        its answers wait: its requests wait in its socket (and its backlog)
        until it reads, and so does the client; others are served on."""
        c.read_paused = True
        self.sel.modify(c.sock, selectors.EVENT_WRITE, self._event(c))

    def _resume_reading(self, c: ControlConnection) -> None:
        """``c`` read its answers down to the limit: read and serve its
        requests again, in order (the next answer is made while the last
        ones still go out)."""
        c.read_paused = False
        ev = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0)
        self.sel.modify(c.sock, ev, self._event(c))
        self.serve_backlog(c)

    def lost(self, c: ControlConnection) -> None:
        self.drop(c)

    # -- connections -----------------------------------------------------
    def _event(self, c: ControlConnection):
        def on_event(mask, c=c):
            if mask & selectors.EVENT_WRITE:
                c.flush()
                if c.read_paused and not c.closed and len(c.out) <= CONTROL_MAX_QUEUE:
                    self._resume_reading(c)
            if mask & selectors.EVENT_READ and not c.closed:
                self._readable(c)
        return on_event

    def accept(self, lsock: socket.socket) -> None:
        while True:
            try:
                sock, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            c = ControlConnection(self, sock)
            self.conns.add(c)
            self.sel.register(sock, selectors.EVENT_READ, self._event(c))

    def detach(self, c: ControlConnection) -> None:
        """Forget ``c`` without closing its socket (a stop answers on it)."""
        self.conns.discard(c)
        self.sel.unregister(c.sock)
        c.closed = True

    def drop(self, c: ControlConnection) -> None:
        if c.closed:
            return
        self.detach(c)
        c.sock.close()

    def drop_all(self) -> None:
        for c in list(self.conns):
            self.drop(c)

    def _readable(self, c: ControlConnection) -> None:
        step = self.meter.begin()
        try:
            try:
                msgs, eof = c.reader.pump(limit=16)
            finally:
                # reading is work too: a step of its own
                self.meter.end(step, "read", "read")
        except errors.ProtocolError as e:
            c.reply(schema.error(f"bad control frame: {e}"))
            self.drop(c)
            return
        c.backlog += msgs
        self.serve_backlog(c)
        if len(c.out) > CONTROL_MAX_QUEUE and not c.closed and not c.read_paused:
            self._pause_reading(c)
        if c.reader.failed is not None:
            # good requests before a bad frame were answered first
            c.reply(schema.error(f"bad control frame: {c.reader.failed}"))
            self.drop(c)
            return
        if eof:
            # A pending create goes on; its answer has nobody to go to.
            self.drop(c)

    # -- requests ----------------------------------------------------------
    def _defer(self, c: ControlConnection) -> None:
        self._deferred_set.add(c)
        self.deferred.append(c)

    def serve_backlog(self, c: ControlConnection) -> None:
        """Serve ``c``'s read requests in order, one step each, until it
        waits for an answer or a step yielded to other work."""
        if c in self._deferred_set:
            return          # read, not served: the loop serves it after the others
        if self.paced:      # served once the window ends
            self._defer(c)
            return
        budget = self.budget
        while c.backlog and not c.waiting and not c.closed and self.running:
            if len(c.out) > CONTROL_MAX_QUEUE:
                if not c.read_paused:
                    self._pause_reading(c)
                return
            (jlen, blen), body = c.backlog.pop(0)
            step = self.meter.begin()
            op = "?"
            budget.preempted = False
            try:
                # Only small frames without payload are remembered; a large
                # body arrives in a bytearray of its own and is never a key.
                memo = not blen and len(body) <= KNOWN_BYTES
                known = self.known.get(body) if memo else None
                if known is None:
                    obj, payload = control.parse_frame(jlen, body)
                    op = str(obj.get("op"))
                    known = self.check(obj, payload, bytes(body) if memo else None)
                op = known[0]
                self.serve(c, *known)
            except errors.ProtocolError as e:
                c.reply(schema.error(str(e)))
            finally:
                self.meter.end(step, op)
            if budget.preempted:
                # A teardown step yielded because others wait: they go first,
                # then this client's requests (the kill controller keeps its
                # next destroys queued), also those that arrive meanwhile.
                budget.preempted = False
                self._defer(c)
                break

    def serve_deferred(self, deferred: list[ControlConnection]) -> None:
        """After the work the deferred clients yielded to: their answers,
        then their next requests (while paced: only the answers)."""
        for c in self.deferred if self.paced else deferred:
            if c.deferred_answer:
                c.send_deferred()
        for c in deferred:
            self._deferred_set.discard(c)
            self.serve_backlog(c)

    def check(self, obj: dict, payload, body: bytes | None) -> tuple[str, dict, memoryview]:
        """(op, arguments, payload) of a parsed request (ProtocolError if
        it is not a valid one). Remembered by its frame ``body`` when given
        (a frame without payload): parsing and checking are pure, and the
        kill controller sends one destroy request thousands of times."""
        op, args = schema.check_request(obj, schema.CONTROL_OPS)
        if body is not None:
            if len(self.known) >= KNOWN_FRAMES:
                self.known.clear()
            self.known[body] = (op, args, payload)
        return op, args, payload

    def answer(self, c: ControlConnection | None, obj: dict, data=b"") -> None:
        """The deferred answer of a waiting client (a create, a job, a fuzz
        run), then its next requests. Nothing if it is gone."""
        if c is None or c.closed:
            return
        c.waiting = False
        c.reply(obj, data)
        self.serve_backlog(c)
