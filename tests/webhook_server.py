"""A webhook receiver for tests: a threaded HTTP/1.1 server (keep-alive) on 127.0.0.1 and a free
port, optionally over TLS, whose answers the test scripts request by request, and which records
everything it received (headers, body, multipart parts).

    with WebhookServer() as server:
        server.script(Reply(500), Reply(429, headers={"Retry-After": "3"}))   # then 200s
        ... POST to server.url ...
        server.requests[0].headers["Idempotency-Key"]

TLS material comes from the openssl CLI (make_test_pki): a CA, a server certificate for
localhost/127.0.0.1 signed by it, a client certificate, and a second, unrelated CA.
"""
from __future__ import annotations

import collections
import http.server
import socket
import socketserver
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path


@dataclass(frozen=True)
class Reply:
    """One scripted answer. delay_s: wait before answering (to provoke client timeouts);
    drop: close the connection instead of answering."""
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    drop: bool = False


@dataclass
class Part:
    name: str | None
    filename: str | None
    content_type: str | None
    headers: dict[str, str]
    data: bytes


@dataclass
class Received:
    method: str
    path: str
    headers: Message            # case-insensitive: headers["idempotency-key"]
    body: bytes
    client_port: int            # the same port for requests on one kept-alive connection
    parts: list[Part] | None    # multipart/form-data bodies, parsed

    def part(self, name: str) -> Part:
        matches = [p for p in self.parts or [] if p.name == name]
        assert len(matches) == 1, f"expected one part {name!r}, got {[p.name for p in self.parts or []]}"
        return matches[0]


def parse_multipart(body: bytes, content_type: str) -> list[Part]:
    """A strict multipart/form-data parser (RFC 7578 / RFC 2046): CRLF line ends, the exact
    boundary, a closing delimiter. Raises ValueError on anything else."""
    params = _header_params(content_type)
    if params.get("") != "multipart/form-data" or not params.get("boundary"):
        raise ValueError(f"not multipart/form-data with a boundary: {content_type!r}")
    delimiter = b"--" + params["boundary"].encode()
    if not body.startswith(delimiter + b"\r\n"):
        raise ValueError("body does not start with the boundary")
    end = body.find(b"\r\n" + delimiter + b"--")
    if end < 0 or body[end + len(delimiter) + 4:] not in (b"", b"\r\n"):
        raise ValueError("no closing boundary at the end of the body")
    parts = []
    for chunk in body[len(delimiter) + 2:end].split(b"\r\n" + delimiter + b"\r\n"):
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("part without a blank line after its headers")
        headers: dict[str, str] = {}
        for line in head.split(b"\r\n"):
            name, colon, value = line.decode("utf-8").partition(":")
            if not colon:
                raise ValueError(f"bad part header line {line!r}")
            headers[name.strip().lower()] = value.strip()
        disposition = _header_params(headers.get("content-disposition", ""))
        if disposition.get("") != "form-data":
            raise ValueError(f"part is not form-data: {headers}")
        parts.append(Part(disposition.get("name"), disposition.get("filename"), headers.get("content-type"),
                          headers, data))
    return parts


def _header_params(value: str) -> dict[str, str]:
    """'multipart/form-data; boundary=x' -> {'': 'multipart/form-data', 'boundary': 'x'}
    (quoted values unquoted; good enough for the values tests send)."""
    items = value.split(";")
    out = {"": items[0].strip().lower()}
    for item in items[1:]:
        key, _, val = item.strip().partition("=")
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = val[1:-1]
        out[key.strip().lower()] = val
    return out


class WebhookServer:
    def __init__(self, tls: TestPki | None = None, require_client_cert: bool = False,
                 cert: str = "server", path: str = "/hook") -> None:
        self.requests: list[Received] = []
        self.errors: list[str] = []        # failed handshakes, broken connections
        self.default = Reply(200, b'{"ok":true}', {"Content-Type": "application/json"})
        self.queued: collections.deque[Reply] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self.live: set[socket.socket] = set()
        self.context = None
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls.dir / f"{cert}.pem", tls.dir / f"{cert}.key")
            if require_client_cert:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(tls.ca)
            self.context = ctx
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True   # headers and body go in two writes

            def log_message(self, *args):   # keep test output clean
                pass

            def setup(self):
                if server.context is not None:
                    self.request.settimeout(5)    # a client that stalls the handshake
                    self.request = server.context.wrap_socket(self.request, server_side=True)
                    self.request.settimeout(None)
                with server.cond:
                    server.live.add(self.request)
                super().setup()

            def finish(self):
                try:
                    super().finish()
                finally:
                    with server.cond:
                        server.live.discard(self.connection)
                    if server.context is not None:
                        self.connection.close()   # the TLS wrapper; socketserver closes the raw one

            def do_POST(self):
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                parts = None
                ctype = self.headers.get("Content-Type", "")
                if ctype.startswith("multipart/"):
                    parts = parse_multipart(body, ctype)
                with server.cond:
                    reply = server.queued.popleft() if server.queued else server.default
                    server.requests.append(Received(self.command, self.path, self.headers, body,
                                                    self.client_address[1], parts))
                    server.cond.notify_all()
                if reply.delay_s and server.stopping.wait(reply.delay_s):
                    return
                if reply.drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request, client_address):
                import sys
                exc = sys.exc_info()[1]
                server.errors.append(f"{type(exc).__name__}: {exc}")

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self._httpd.server_address[1]
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}{path}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with these, in order; afterwards self.default."""
        with self.cond:
            self.queued.extend(replies)

    def wait_for(self, n: int, timeout_s: float = 5.0) -> list[Received]:
        end = time.monotonic() + timeout_s
        with self.cond:
            while len(self.requests) < n:
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"server got {len(self.requests)} requests, expected {n}")
                self.cond.wait(left)
            return list(self.requests)

    def drop_connections(self) -> None:
        """Close every open connection (as a server closing idle keep-alive connections does),
        but keep listening."""
        with self.cond:
            live = list(self.live)
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        """Stop listening and close open connections: clients now get 'connection refused'."""
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self.drop_connections()

    def __enter__(self) -> WebhookServer:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.stopping.is_set():
            self.stop()


# ---- TLS material -------------------------------------------------------------------------


@dataclass(frozen=True)
class TestPki:
    dir: Path

    @property
    def ca(self) -> Path:            # signed server.pem and client.pem
        return self.dir / "ca.pem"

    @property
    def other_ca(self) -> Path:      # an unrelated CA: verifying with it must fail
        return self.dir / "other-ca.pem"

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"


TestPki.__test__ = False   # not a pytest test class


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(d: Path, name: str, cn: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={cn}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", "subjectKeyIdentifier=hash", cwd=d)


def _make_leaf(d: Path, name: str, cn: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n" + ext + "\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


def make_test_pki(d: Path) -> TestPki:
    """ca, server (localhost, 127.0.0.1), wronghost (only other.example), client, other-ca."""
    d.mkdir(parents=True, exist_ok=True)
    _make_ca(d, "ca", "Appliance Test CA")
    _make_ca(d, "other-ca", "Unrelated Test CA")
    _make_leaf(d, "server", "localhost",
               "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    _make_leaf(d, "wronghost", "other.example",
               "subjectAltName=DNS:other.example\nextendedKeyUsage=serverAuth")
    _make_leaf(d, "client", "gw-test-01", "extendedKeyUsage=clientAuth")
    return TestPki(d)
