"""The control socket's server: Commands served to local clients (the console, socat).

Threads in the supervisor process: one accepts, one per connection (at most MAX_CLIENTS).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
import threading
import time
from pathlib import Path

from appliance import __version__
from appliance.ops.control.commands import Commands
from appliance.ops.control.logring import LogRing
from appliance.ops.control.protocol import CLIENT_IDLE_S, MAX_CLIENTS, MAX_LINE, Reply, socket_path
from appliance.ops.control.samples import RateTracker

log = logging.getLogger("appliance.control")


class ControlServer:
    """Serves Commands on a unix socket. start() binds (refusing if another live appliance
    already serves that path), stop() closes every connection and removes the socket."""

    def __init__(self, sup, path: Path | str | None = None, *, config_path: Path | str | None = None) -> None:
        self.sup = sup
        self.path = Path(path) if path else socket_path(sup.cfg.gateway.data_dir)
        self.ring = LogRing()
        self.rates = RateTracker(self._counters)
        self.commands = Commands(sup, config_path=config_path, ring=self.ring, rates=self.rates)
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._clients: dict[socket.socket, threading.Thread] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="control-accept", daemon=True)

    def _counters(self) -> dict[str, float]:
        reg = self.sup.metrics.registry
        out = {}
        for name in list(self.sup.sources):
            out[f"s:{name}"] = reg.get_sample_value("appliance_source_samples_total", {"source": name}) or 0.0
        for name in list(self.sup.modules):
            out[f"m:{name}"] = reg.get_sample_value("appliance_module_windows_total", {"module": name}) or 0.0
        return out

    def start(self) -> "ControlServer":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            # Before listen(): until then a connect() is refused, so nobody gets in while the
            # file still has the umask's mode.
            os.chmod(self.path, 0o600)
            sock.listen(MAX_CLIENTS)
        except OSError:
            sock.close()
            raise
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        sock.settimeout(0.25)
        self._sock = sock
        logging.getLogger().addHandler(self.ring)
        self.rates.start()
        self._thread.start()
        log.info("control socket at %s", self.path)
        return self

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{self.path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink()   # left by a process that died: nobody listens
            return
        finally:
            probe.close()
        raise OSError(f"another appliance serves {self.path}; not starting a second control socket")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        with self._lock:
            clients = list(self._clients.items())
        for conn, _ in clients:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for _, thread in clients:
            thread.join(2.0)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:   # only our own socket: a newer process may have bound the path since
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    self.path.unlink()
            except FileNotFoundError:
                pass
        self.rates.stop()
        logging.getLogger().removeHandler(self.ring)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                log.exception("control: accept failed")
                time.sleep(0.5)
                continue
            who = self._peer(conn)
            if who is None:
                conn.close()
                continue
            conn.settimeout(CLIENT_IDLE_S)   # an idle client gives its slot back
            with self._lock:
                if len(self._clients) >= MAX_CLIENTS:
                    with contextlib.suppress(OSError):
                        conn.sendall(Reply(False, [f"too many control connections ({MAX_CLIENTS})"]).encode(False))
                    conn.close()
                    continue
                thread = threading.Thread(target=self._serve, args=(conn, who), name="control-client", daemon=True)
                self._clients[conn] = thread
            thread.start()

    @staticmethod
    def _peer(conn: socket.socket) -> str | None:
        """'uid U pid P' of the peer; None (refused) unless it is our own user or root."""
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _ = struct.unpack("3i", creds)
        except OSError:
            return None   # who it is cannot be told: refuse
        if uid not in (0, os.getuid()):
            log.warning("control: refused a connection from uid %d (pid %d)", uid, pid)
            return None
        return f"pid {pid}"

    def _serve(self, conn: socket.socket, who: str) -> None:
        try:
            reader = conn.makefile("rb")
            while not self._stop.is_set():
                try:
                    raw = reader.readline(MAX_LINE + 1)
                except OSError:
                    return
                if not raw:
                    return
                if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
                    conn.sendall(Reply(False, [f"request longer than {MAX_LINE} bytes"]).encode(False))
                    return
                line = raw.decode("utf-8", "replace").strip()
                as_json = line.startswith("json ") or line == "json"
                if as_json:
                    line = line[4:].strip()
                # A client may announce what it is (e.g. "console /dev/ttyGS0") for the log.
                if line.startswith("hello "):
                    who = f"{line[6:].strip()[:80]}, {who}"
                    reply = Reply(True, [f"appliance {__version__}"])
                else:
                    reply = self.commands.execute(line, who)
                conn.sendall(reply.encode(as_json))
        except OSError:
            return
        finally:
            with self._lock:
                self._clients.pop(conn, None)
            with contextlib.suppress(OSError):
                conn.close()
