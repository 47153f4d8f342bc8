"""The content-based dedup scanner: the toolstack part of memory sharing.

Xen shares only what the toolstack names (docs/semantics.md): it never
looks at page contents, and it makes that trust safe with handles. This
package is the caller that finds the identical pages, in the spirit of
VMware ESX's transparent page sharing (hash, then full compare) and Linux
KSM (``mm/ksm.c``: periodic scans, checksums to skip pages that keep
changing). docs/design.md, "Dedup", explains a pass phase by phase.

- :mod:`.backend`: the seam to a hypervisor (:class:`InProcessBackend`,
  :class:`SocketBackend`: budgeted, pipelined requests);
- :mod:`.pages`: the zero test, the hash, byte equality, p2m snapshots;
- :mod:`.scanner`: :class:`Scanner`, a pass (plan, then execute);
- :mod:`.watch`: :class:`Watcher`, watch mode (a scanner driven as ksmd);
  :mod:`.knobs`, its tunables; :mod:`.daemon`, its control socket.

Tunables
--------
- ``batch_pages`` (:class:`Scanner`, ``hvctl dedup --share-batch``, default
  :data:`BATCH_PAGES` = 1024): most pairs per ``share_many`` request; a
  cap, the request budget decides a step's size.
- :data:`NOMINATE_FACTOR` (3): a ``nominate_many`` request carries up to
  this many times ``batch_pages`` gfns.
- ``request_budget_ms`` and ``depth`` (:class:`SocketBackend`, defaults
  :data:`REQUEST_BUDGET_MS` = 0.5 and :data:`PIPELINE_DEPTH` = 2): the work
  time the hypervisor may spend on one batch request (None: no budget;
  the default is :data:`hvshare.hvcore.constants.DEDUP_REQUEST_BUDGET_SECONDS`, a
  share of the hypervisor's step budget), and requests in flight.
- ``round_pages`` (:class:`Scanner`, default :data:`ROUND_PAGES` = 4096):
  members nominated, verified and shared together.
- ``skip_volatile`` (:class:`Scanner`, default True): skip pages whose
  checksum changed since their last scan.
- :class:`Knobs` (:meth:`Watcher.watch`, :mod:`.knobs`): watch mode's
  ``pages_to_scan`` per pass (default :data:`PAGES_TO_SCAN` = 20,000),
  ``sleep_millisecs`` after each (default :data:`SLEEP_MILLISECS` = 100)
  and ``share_batch`` (``batch_pages`` of each pass), changed while it
  runs; ``hvctl dedup-set`` changes them through the daemon's control
  socket (:mod:`.daemon`).
- :data:`CHUNK_PAGES` (1024): pages per vectorised chunk of the zero test.

Counters (:attr:`Scanner.counters`, KSM's names where they exist)
-----------------------------------------------------------------
- ``pages_shared``: shared frames mapped by running domains, after the last
  pass (KSM: KSM pages in use);
- ``pages_sharing``: gfns mapping those frames beyond the first of each,
  i.e. frames saved;
- ``pages_unshared``: private pages whose last scan found no identical page;
- ``pages_volatile``: private pages whose last scan found them changing;
- ``full_scans``: passes that covered every gfn of the scanned domains;
- ``pages_scanned``, ``pages_merged``, ``pages_skipped``, ``passes``:
  running totals over the scanner's life.
"""
from __future__ import annotations

from .backend import (PIPELINE_DEPTH, REQUEST_BUDGET_MS, SCANNER_OPS, Backend, InProcessBackend,
                      SocketBackend, step_delta)
from .pages import CHUNK_PAGES, ZERO_SUM, page_hashes, zero_pages
from .knobs import BATCH_PAGES, KNOBS, PAGES_TO_SCAN, SLEEP_MILLISECS, Knobs
from .scanner import NOMINATE_FACTOR, ROUND_PAGES, Batch, PassResult, Plan, Scanner
from .watch import Watcher

__all__ = ["Backend", "InProcessBackend", "SocketBackend", "Scanner", "Watcher", "Plan", "Batch",
           "PassResult", "step_delta", "page_hashes", "zero_pages", "BATCH_PAGES", "NOMINATE_FACTOR",
           "ROUND_PAGES", "CHUNK_PAGES", "Knobs", "KNOBS", "PAGES_TO_SCAN", "SLEEP_MILLISECS", "ZERO_SUM",
           "SCANNER_OPS", "REQUEST_BUDGET_MS", "PIPELINE_DEPTH"]
