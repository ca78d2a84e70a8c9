"""The interface every upstream transport implements (one place; see forwarder.py)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from appliance.events.record import Attachment


class TransientError(Exception):
    """Not delivered, try again later (network down, broker gone, 5xx, timeout, 408, 429).
    retry_after_s: the far side's hint (HTTP Retry-After), if it gave one."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermanentError(Exception):
    """The far side refused this event for good (HTTP 4xx other than 408/429): retrying the
    same bytes cannot succeed. The forwarder keeps it (parked, counted, logged), never drops it."""


class Transport(ABC):
    name: str = ""

    @abstractmethod
    def connect(self) -> None:
        """Open the connection (raise TransientError when the far side is unreachable)."""

    @property
    @abstractmethod
    def connected(self) -> bool: ...

    @abstractmethod
    def send(self, event: dict[str, Any], attachments: list[Attachment]) -> int:
        """Deliver one event with its attachments and block until the far side acknowledged it
        (MQTT: PUBACK of every message; HTTP: a 2xx). Returns the bytes put on the wire.
        Raises TransientError or PermanentError."""

    def publish_status(self, online: bool) -> None:  # noqa: B027  (optional: not every transport has one)
        """Retained online/offline status, where the transport has such a thing."""

    def publish_health(self, summary: dict[str, Any]) -> int:
        """A health summary (never raw data); returns bytes sent, 0 if unsupported."""
        return 0

    @abstractmethod
    def close(self) -> None: ...
