"""A client of the control socket (the console uses it)."""
from __future__ import annotations

import contextlib
import socket
from pathlib import Path

from appliance.ops.control.protocol import ControlError, Reply


class ControlClient:
    """One connection to a ControlServer, (re)opened on demand."""

    def __init__(self, path: Path | str, timeout_s: float = 120.0, hello: str | None = None) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.hello = hello
        self._sock: socket.socket | None = None
        self._reader = None

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            reason = "no such socket" if isinstance(exc, FileNotFoundError) else \
                "nobody listening" if isinstance(exc, ConnectionRefusedError) else exc.strerror or str(exc)
            raise ControlError(f"the appliance is not running (control socket {self.path}: {reason})") from None
        self._sock, self._reader = sock, sock.makefile("rb")
        if self.hello:
            self._exchange(f"hello {self.hello}")

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._reader.close()
                self._sock.close()
        self._sock = self._reader = None

    def _exchange(self, line: str) -> Reply:
        self._sock.sendall(line.replace("\n", " ").encode() + b"\n")
        status = self._reader.readline()
        if not status:
            raise ConnectionResetError("the appliance closed the connection")
        status = status.rstrip(b"\r\n")
        if status not in (b"OK", b"ERR"):
            raise ControlError(f"unexpected reply from {self.path}: {status[:80]!r}")
        lines = []
        while True:
            raw = self._reader.readline()
            if not raw:
                raise ConnectionResetError("the appliance closed the connection mid-reply")
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not text:
                return Reply(status == b"OK", lines)
            lines.append(text)

    def request(self, line: str) -> Reply:
        """Send one command; reconnect once if the appliance restarted since the last one."""
        for attempt in (0, 1):
            try:
                if self._sock is None:
                    self._connect()
                return self._exchange(line)
            except socket.timeout:
                self.close()
                raise ControlError(f"no answer from the appliance within {self.timeout_s:.0f} s") from None
            except ControlError:
                self.close()
                raise
            except OSError:
                self.close()
                if attempt:
                    raise ControlError("the appliance closed the connection") from None
        raise AssertionError("unreachable")
