"""Wire formats: the control socket and the guest pipes, with validation.

Modules: :mod:`.pipe` (guest pipe messages), :mod:`.control` (control
frames), :mod:`.schema` (the operations and their arguments) and
:mod:`.reader` (the one incremental reader both channels use).

Two channels, two formats, chosen for what travels on them:

**Guest pipes** (one pair per guest, hot path: every guest write and CoW
fault) carry compact binary messages: an 8-byte header ``<HHI`` (type, seq,
body length) and a body of packed structs and raw numpy arrays. The pipe
identifies the domain, so no message names a domid. Guest -> hypervisor:

- ``G_HELLO``  ``<I`` pid: the guest has mapped its memory and serves.
- ``G_WRITE``  ``<QI`` gfn, offset, then the bytes to write (one page at most).
- ``G_WRITE_PAGES`` ``<I4x`` count, then ``int64[count]`` gfns, then
  ``count * 4096`` bytes of pages: one message, one batched core call.
- ``G_STATS``  the guest's own counters (:data:`STATS`), no answer.
- ``G_WRITE_MANY`` ``<I4x`` count, then ``int64[count]`` gfns,
  ``uint32[count]`` offsets, ``uint32[count]`` lengths, then the bytes of
  every write in order: many small writes (a CoW fault each, if shared) in
  one message, one batched core call.
- ``G_POPULATE`` ``<I4x`` count, then ``int64[count]`` gfns: a fork's read
  fault, the holes it is about to read (the hypervisor fills them from the
  fork's ancestors, :mod:`hvshare.hvcore.fork`); answered with the gfns filled.
- ``G_DONE`` ``<QII`` iteration, pages written, pages read: the fuzz
  workload finished one iteration (no answer).

Hypervisor -> guest: ``H_REPLY`` (``<iq`` status, value; ``seq`` is the
request's), and the bodiless ``H_PAUSE``, ``H_UNPAUSE``, ``H_SHUTDOWN`` and
``H_RUN`` (run one fuzz iteration); and ``H_CONFIG`` (JSON), the first
message of a warm guest, started before its domain existed: the domain it
is to run (:mod:`hvshare.hvcore.process.stock`).
A status is 0 or the Xen code of the failure (:mod:`hvshare.hvcore.errors`).

**Control socket and guest control channels** (toolstack requests, rare and
rich) carry frames: an 8-byte header ``<II`` (JSON length, binary length), a
JSON object, then an optional binary payload (page contents, gfn arrays).
A request is ``{"op": NAME, ...arguments}``; an answer is ``{"ok": true,
...result}`` or ``{"ok": false, "error": SENTENCE, "code": N, "code_name":
NAME}``. Every request is checked against a schema (:func:`~hvcore.wire.schema.check_request`)
before anything acts on it: unknown operations, unknown or missing
arguments, wrong types and out-of-range numbers are refused with one
sentence.

Both directions of both channels are read with :class:`~hvcore.wire.reader.MessageReader`, an
incremental decoder for non-blocking descriptors that validates lengths
from the header before it buffers a body, and reads large bodies straight
into their own buffer (no quadratic concatenation).
"""
