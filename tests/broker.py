"""A real Mosquitto broker for tests: plain, password or TLS (CA, server and client certificates made
with the openssl CLI), on 127.0.0.1 and a free port, plus a Subscriber that records what arrives."""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

HOST = "127.0.0.1"


def mosquitto_bin() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None)
    if found is None:
        pytest.fail("mosquitto is missing: make test installs it")
    return found


def _tool(name: str) -> str:
    found = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if found is None:
        pytest.fail(f"{name} is missing: make test installs it")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# ---- certificates (openssl CLI; EC P-256 keys are quick to make) --------------------------------------

@dataclass(frozen=True)
class Pki:
    ca: Path            # the CA that signed the broker's and the client's certificates
    server_cert: Path   # CN=localhost, subjectAltName DNS:localhost, IP:127.0.0.1
    server_key: Path
    client_cert: Path   # CN=test-gw, signed by ca
    client_key: Path
    other_ca: Path      # an unrelated CA: verifying the broker with it must fail


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run([_tool("openssl"), *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          check=False)
    if proc.returncode:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)


def _make_leaf(d: Path, name: str, ca: str, cn: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


def make_pki(d: Path) -> Pki:
    d.mkdir(parents=True, exist_ok=True)
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_leaf(d, "server", "ca", "localhost",
               "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
               "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _make_leaf(d, "client", "ca", "test-gw",
               "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n")
    return Pki(ca=d / "ca.pem", server_cert=d / "server.pem", server_key=d / "server.key",
               client_cert=d / "client.pem", client_key=d / "client.key", other_ca=d / "other-ca.pem")


# ---- the broker --------------------------------------------------------------------------------------

try:   # looked up here, in the parent: the child (forked from a threaded process) only calls it
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def _die_with_parent() -> None:
    # The broker goes when the test process goes, even if it is killed before any finalizer runs.
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


class Broker:
    """Mosquitto on 127.0.0.1:<free port> with a config generated in `workdir`.

    users: {name: password} -> allow_anonymous false and a mosquitto_passwd file.
    acl_file: Mosquitto ACLs (with users).
    pki: serve TLS with its server certificate; require_certificate: clients must show one
    signed by pki.ca (and it is then the only authentication asked for)."""

    def __init__(self, workdir: Path, *, users: dict[str, str] | None = None, pki: Pki | None = None,
                 require_certificate: bool = False, acl_file: Path | None = None) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.users, self.pki, self.require_certificate = users or {}, pki, require_certificate
        self.acl_file = acl_file
        if require_certificate and pki is None:
            raise ValueError("require_certificate needs a pki")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "mosquitto.log"
        self.conf_path = self.dir / "mosquitto.conf"
        self._write_config()

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} {HOST}",
            "persistence true",
            f"persistence_location {self.dir}/",
            f"log_dest file {self.log_path}",
            "log_type all",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            lines.append("user root")   # else mosquitto drops to its own user and cannot read the temp dir
        if self.users:
            pw = self.dir / "passwd"
            for i, (name, password) in enumerate(self.users.items()):
                args = ["-b", "-c"] if i == 0 else ["-b"]
                subprocess.run([_tool("mosquitto_passwd"), *args, str(pw), name, password], check=True,
                               capture_output=True, timeout=30)
            lines += ["allow_anonymous false", f"password_file {pw}"]
            if self.acl_file is not None:
                lines.append(f"acl_file {self.acl_file}")
        elif self.require_certificate:
            lines += ["allow_anonymous false", "use_identity_as_username true"]
        else:
            lines.append("allow_anonymous true")
        if self.pki:
            lines += [f"cafile {self.pki.ca}", f"certfile {self.pki.server_cert}", f"keyfile {self.pki.server_key}",
                      f"require_certificate {'true' if self.require_certificate else 'false'}"]
        self.conf_path.write_text("\n".join(lines) + "\n")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 5.0) -> Broker:
        if self.running:
            return self
        self.proc = subprocess.Popen([mosquitto_bin(), "-c", str(self.conf_path)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=_die_with_parent)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {err.strip()}\n{self.log()}")
            try:
                socket.create_connection((HOST, self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {HOST}:{self.port} within {timeout_s} s\n{self.log()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)   # in case a test froze it
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def restart(self) -> Broker:
        self.stop()
        return self.start()

    def freeze(self) -> None:
        """SIGSTOP: the TCP connections stay open but nothing is answered (a hung broker)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client_settings(self) -> dict:
        """What an MqttConfig needs to reach this broker (the first user, the client certificate)."""
        settings: dict = {"host": HOST, "port": self.port}
        if self.users:
            name, password = next(iter(self.users.items()))
            settings.update(username=name, password=password)
        if self.pki:
            tls: dict = {"ca": str(self.pki.ca)}
            if self.require_certificate:
                tls.update(cert=str(self.pki.client_cert), key=str(self.pki.client_key))
            settings["tls"] = tls
        return settings

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- a subscriber that records what arrives ---------------------------------------------------------

@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass
class Subscriber:
    """A paho client subscribed (QoS 1) to `topics` on `broker`, collecting messages in arrival order.
    clean=False with a client_id keeps a persistent session on the broker."""
    broker: Broker
    topics: list[str]
    client_id: str = ""
    clean: bool = True
    messages: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id or f"sub-{id(self)}",
                                  clean_session=self.clean, protocol=mqtt.MQTTv311)
        s = self.broker.client_settings()
        if "username" in s:
            self.client.username_pw_set(s["username"], s["password"])
        if "tls" in s:
            ctx = ssl.create_default_context(cafile=s["tls"]["ca"])
            if "cert" in s["tls"]:
                ctx.load_cert_chain(s["tls"]["cert"], s["tls"]["key"])
            self.client.tls_set_context(ctx)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            self.messages.append(Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))
            self._cond.notify_all()

    def start(self, timeout_s: float = 5.0) -> Subscriber:
        self.client.connect(self.broker.client_settings()["host"], self.broker.port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(timeout_s):
            self.stop()
            raise AssertionError(f"subscriber not subscribed within {timeout_s} s\n{self.broker.log()}")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.client.on_connect = self.client.on_subscribe = self.client.on_message = None   # no cycle

    def on(self, topic: str) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def wait(self, predicate: Callable[[list[Received]], bool], timeout_s: float = 5.0,
             what: str = "messages") -> list[Received]:
        end = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(self.messages):
                left = end - time.monotonic()
                if left <= 0:
                    got = "\n".join(f"  {m.topic} retain={m.retain} {m.payload[:120]!r}" for m in self.messages)
                    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; received:\n{got}")
                self._cond.wait(left)
            return list(self.messages)

    def wait_for(self, topic: str, count: int = 1, timeout_s: float = 5.0) -> list[Received]:
        self.wait(lambda ms: sum(m.topic == topic for m in ms) >= count, timeout_s, f"{count} on {topic}")
        return self.on(topic)

    def __enter__(self) -> Subscriber:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
