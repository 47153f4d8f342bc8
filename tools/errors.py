"""The toolstack's errors, and the one place an answer becomes one.

Every answer of the hypervisor or of a guest is a JSON object with
``ok``; a failed one carries the hypervisor's one-sentence ``error`` and
its Xen code (``code``, ``code_name``). :func:`check_answer` turns it into
an :class:`HVCtlError`; every client of the toolstack goes through it.
"""
from __future__ import annotations

__all__ = ["HVCtlError", "NoHypervisor", "GuestGone", "check_answer", "timed_out"]


class HVCtlError(Exception):
    """A request failed; ``str()`` is one sentence, ``code`` the Xen code."""

    def __init__(self, message: str, code: int = 22, code_name: str = "EINVAL"):
        super().__init__(message)
        self.code, self.code_name = code, code_name


class NoHypervisor(HVCtlError):
    """Nothing serves the control socket."""


class GuestGone(HVCtlError):
    """The guest's control channel is closed (the guest is not running)."""


def check_answer(answer: dict, what: str = "request") -> dict:
    """``answer`` itself if it says ``ok``, else its error raised as
    :class:`HVCtlError`."""
    if not answer.get("ok"):
        raise HVCtlError(answer.get("error", f"{what} failed"), answer.get("code", 22),
                         answer.get("code_name", "EINVAL"))
    return answer


def timed_out(message: str) -> HVCtlError:
    """The error of a request that got no answer in time (``ETIMEDOUT``)."""
    return HVCtlError(message, 110, "ETIMEDOUT")
