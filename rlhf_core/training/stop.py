"""Stopping a running loop on request (SIGTERM) without losing a finished step. No torch here, so
the process that owns the signals can hold a request without importing the library's weight."""
from __future__ import annotations

from rlhf_core.errors import RLHFError


class Stopped(RLHFError):
    """A stop was requested (SIGTERM): the loop wrote a checkpoint of its last step and stopped."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """A request that the running loop stop after its current step. The process that owns the
    signals (the CLI's SIGTERM handler) sets it; the loop reads it through its `RunContext`."""

    def __init__(self):
        self.signum: int | None = None

    def set(self, signum: int | None) -> None:
        """Ask for a stop with this signal number; None withdraws the request."""
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None
