"""The toolstack's Python API, in one import.

Three layers, each usable alone:

- :func:`start_hypervisor` (:mod:`hvshare.tools.session`) launches a detached
  hypervisor and returns once it serves;
- :class:`HypervisorClient`, :class:`GuestClient` and :class:`EventStream`
  (:mod:`hvshare.tools.client`) speak the control sockets;
- :func:`hvshare_session` (:mod:`hvshare.tools.session`) is a context manager
  around a real hypervisor on a private socket that, on exit, leaves no
  process, no shared-memory segment and no socket behind.

Every failure the hypervisor reports arrives as :class:`HVCtlError` with the
hypervisor's one-sentence message and Xen code; a missing hypervisor is
:class:`NoHypervisor` (:mod:`hvshare.tools.errors`).
"""
from __future__ import annotations

from hvshare.hvcore.constants import DEFAULT_FRAMES, SCHED_MODES, TEARDOWN_MODES

from .client import EventStream, GuestClient, HypervisorClient, default_socket_path
from .errors import GuestGone, HVCtlError, NoHypervisor
from .session import HVSession, cleanup_dead, hvshare_session, running_pid, start_hypervisor

__all__ = ["HVCtlError", "NoHypervisor", "GuestGone", "HypervisorClient", "GuestClient", "EventStream",
           "HVSession", "hvshare_session", "start_hypervisor", "running_pid", "cleanup_dead",
           "default_socket_path", "DEFAULT_FRAMES", "SCHED_MODES", "TEARDOWN_MODES"]
