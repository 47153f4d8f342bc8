"""Errors of the sharing operations, carrying Xen's return codes.

Every failure of a hypercall-like operation raises :class:`HVError` with the
code Xen returns for it, so callers (and the wire protocols) can pass the code
on unchanged. Positive errno values are returned negated by Xen; here
``code`` is the errno name's value and ``name`` its symbol.

A peer that breaks a wire format gets :class:`ProtocolError` instead: one
sentence, and never a code of the sharing operations.
"""
from __future__ import annotations

import errno

EINVAL = errno.EINVAL          # gfn not populated RAM, bad argument
E2BIG = errno.E2BIG            # page has extra references
EBUSY = errno.EBUSY            # domain is dying
ENOMEM = errno.ENOMEM          # no free frame
ESRCH = errno.ESRCH            # no such domain
EEXIST = errno.EEXIST          # a domain of that name exists
EIO = errno.EIO                # an internal error of the hypervisor
ECANCELED = errno.ECANCELED    # the hypervisor stopped before the operation finished
EACCES = errno.EACCES          # not allowed to read a create's source (a process, a file)
ENOENT = errno.ENOENT          # a create's source file does not exist
S_HANDLE_INVALID = -10         # XENMEM_SHARING_OP_S_HANDLE_INVALID
C_HANDLE_INVALID = -9          # XENMEM_SHARING_OP_C_HANDLE_INVALID

NAMES = {
    EINVAL: "EINVAL", E2BIG: "E2BIG", EBUSY: "EBUSY", ENOMEM: "ENOMEM",
    ESRCH: "ESRCH", EEXIST: "EEXIST", ECANCELED: "ECANCELED", EIO: "EIO",
    EACCES: "EACCES", ENOENT: "ENOENT",
    S_HANDLE_INVALID: "S_HANDLE_INVALID", C_HANDLE_INVALID: "C_HANDLE_INVALID",
}


class HVError(Exception):
    """A sharing operation failed with a Xen return code."""

    def __init__(self, code: int, message: str = ""):
        self.code = code
        self.name = NAMES.get(code, str(code))
        super().__init__(f"{self.name}: {message}" if message else self.name)


class ProtocolError(Exception):
    """A peer sent something the protocol does not allow (one sentence)."""


def sentence(e: HVError) -> str:
    """The message of ``e`` as one sentence for a user, without its code's name."""
    msg = str(e)
    prefix = f"{e.name}: "
    if msg.startswith(prefix):
        msg = msg[len(prefix):]
    if e.code == ESRCH and msg.startswith("no domain "):
        msg = "no domain with id " + msg[len("no domain "):]
    return msg or e.name
