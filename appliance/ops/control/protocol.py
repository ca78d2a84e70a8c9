"""The control socket's wire protocol (docs/console.md), shared by the server and its clients.

A unix stream socket at <data_dir>/control.sock, mode 0600 (only the appliance's user, and
root, may connect; the peer's uid is checked as well). Line-oriented, UTF-8, any number of
requests per connection:

    request:  one command line, ended by LF (CR LF accepted), at most 4096 bytes
    reply:    a status line, "OK" or "ERR"
              the body: text lines, none of them empty
              an empty line, which ends the reply

A request prefixed with "json " (e.g. `json status`) gets a body of exactly one line of JSON:
the command's data, or {"text": [lines]} for commands without structured data; an ERR body is
then {"error": "..."}.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SOCKET_NAME = "control.sock"
MAX_LINE = 4096
MAX_CLIENTS = 8
CLIENT_IDLE_S = 15 * 60   # as the console's own idle logout


def socket_path(data_dir: Path | str) -> Path:
    return Path(data_dir) / SOCKET_NAME


@dataclass
class Reply:
    ok: bool = True
    lines: list[str] = field(default_factory=list)
    data: Any = None

    def encode(self, as_json: bool) -> bytes:
        if as_json:
            if self.ok:
                payload = self.data if self.data is not None else {"text": self.lines}
            else:
                payload = {"error": "\n".join(self.lines)}
            body = [json.dumps(payload, default=str, separators=(",", ":"))]
        else:
            # An empty line ends a reply, so a body never has one; a lone space stands in.
            body = [(line.rstrip("\r") or " ") for text in self.lines for line in str(text).split("\n")]
        return ("\n".join(["OK" if self.ok else "ERR", *body, "", ""])).encode("utf-8", "replace")


class CommandError(Exception):
    """Raised by a command: the message goes back as an ERR reply."""


class ControlError(Exception):
    """The control socket cannot be reached or answered nonsense."""
