"""HTTP(S) webhook transport: each event is one POST; the far side's 2xx is the acknowledgement.

Standard library only (http.client + ssl). Request formats, status handling and TLS are
described in docs/uplink-http.md; in short:

- no attachments: `Content-Type: application/json`, the body is the event exactly as the spool
  stored it (sorted keys, compact separators);
- with attachments: `multipart/form-data`, part `event` first (the same JSON), then one part per
  attachment, named by the attachment's name; the event's `attachments` list carries each one's
  size and sha256, so the receiver links and checks them by event id;
- `Idempotency-Key: <event id>` on every event, so a receiver can drop the duplicates that
  retries after a lost acknowledgement produce; `X-Appliance-Kind: event` or `health`;
- 2xx delivered; 408, 429, 5xx, timeouts and network/TLS errors -> TransientError (with the
  Retry-After hint where given); any other status -> PermanentError (the forwarder parks it).

One keep-alive connection per endpoint, reopened after any error; a request that fails because
the server quietly closed an idle kept-alive connection is retried once on a fresh connection.
"""
from __future__ import annotations

import datetime as dt
import email.utils
import http.client
import json
import logging
import re
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic.functional_validators import AfterValidator

from appliance.events.record import Attachment, encode_event
from appliance.uplink.transport import PermanentError, TransientError, Transport
from hal.schema import ExistingFile, StrictModel

log = logging.getLogger("appliance.uplink.http")

KIND_HEADER = "X-Appliance-Kind"
OMITTED_HEADER = "X-Appliance-Attachments-Omitted"
IDEMPOTENCY_HEADER = "Idempotency-Key"
# Headers the transport sets itself; a config may not override them.
RESERVED_HEADERS = frozenset(h.lower() for h in (
    "Host", "Content-Type", "Content-Length", "Transfer-Encoding", "Connection", "Expect",
    IDEMPOTENCY_HEADER, KIND_HEADER, OMITTED_HEADER))
RESPONSE_BODY_LIMIT = 64 * 1024     # read at most this much of a reply (error excerpts need little)
WATCHDOG_GRACE_S = 0.25
EXCERPT_CHARS = 200                 # how much of an error reply goes into the exception message
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")   # RFC 9110 header field name


def _user_agent() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"factory-gateway-appliance/{version('factory-gateway-appliance')}"
    except PackageNotFoundError:   # not installed as a distribution (running from a source tree)
        return "factory-gateway-appliance"


USER_AGENT = _user_agent()


# ---- config ---------------------------------------------------------------------------------


def _webhook_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{value!r}: the URL must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"{value!r}: the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are not supported: put them in headers "
                         "(e.g. Authorization) or token_file")
    if parts.fragment:
        raise ValueError(f"{value!r}: a URL fragment (#...) means nothing to the server; remove it")
    try:
        _ = parts.port                  # raises for a port that is not a number or out of range
    except ValueError as exc:
        raise ValueError(f"{value!r}: {exc}") from None
    return value


WebhookUrl = Annotated[str, AfterValidator(_webhook_url)]


class HttpTls(StrictModel):
    ca: ExistingFile | None = Field(None, description="CA certificate(s) (PEM) that signed the server's certificate; "
                                    "default: the system's trust store")
    cert: ExistingFile | None = Field(None, description="client certificate (PEM) for servers that require one; "
                                      "may also hold the key")
    key: ExistingFile | None = Field(None, description="the client certificate's private key (PEM, unencrypted)")
    insecure_skip_verify: bool = Field(False, description="accept any server certificate (tests only: "
                                       "anyone on the path can read and alter the traffic)")

    @model_validator(mode="after")
    def _pairs(self):
        if self.key is not None and self.cert is None:
            raise ValueError("tls.key is given without tls.cert")
        return self

    @property
    def is_default(self) -> bool:
        return self == HttpTls()


class HttpConfig(StrictModel):
    url: WebhookUrl = Field(description="where events are POSTed (http:// or https://)")
    headers: dict[str, str] = Field({}, description="extra request headers, e.g. Authorization or an API key")
    token_file: ExistingFile | None = Field(None, description="file holding a bearer token, sent as "
                                            "`Authorization: Bearer <token>` (keeps the secret out of the YAML; "
                                            "read again for every request, so it can be rotated)")
    timeout_s: float = Field(10.0, gt=0, le=600, description="longest a request may take, connecting included; "
                             "then it counts as failed and is retried")
    tls: HttpTls = Field(HttpTls(), description="TLS settings for https:// URLs")
    max_attachment_bytes: int = Field(256 * 1024, ge=0, le=64 * 1024 * 1024,
                                      description="larger attachments are not sent (the event is, with "
                                      "X-Appliance-Attachments-Omitted naming them)")
    health_url: WebhookUrl | None = Field(None, description="where health summaries go; default: url, "
                                          "told apart by the header X-Appliance-Kind: health")

    @field_validator("headers")
    @classmethod
    def _plain_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _TOKEN.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by the transport itself and cannot be configured")
            if any(c in text for c in "\r\n\0"):
                raise ValueError(f"header {name!r}: values may not contain line breaks")
            try:
                text.encode("latin-1")
            except UnicodeEncodeError:
                raise ValueError(f"header {name!r}: HTTP header values must be Latin-1 text") from None
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.token_file is not None and any(n.lower() == "authorization" for n in self.headers):
            raise ValueError("give either token_file or an Authorization header, not both")
        if not self.tls.is_default and not self.uses_https:
            raise ValueError("tls settings are given but no URL uses https://")
        if self.uses_https:
            make_ssl_context(self.tls)   # a key that does not match its certificate fails here, at load
        return self

    @property
    def uses_https(self) -> bool:
        return any(urlsplit(u).scheme == "https" for u in (self.url, self.health_url) if u)


def _encrypted_key() -> bytes:
    raise ValueError("the key is encrypted; give an unencrypted key (protect it by file permissions)")


def make_ssl_context(tls: HttpTls) -> ssl.SSLContext:
    """The client TLS context for tls (ValueError with a readable message when a file is unusable)."""
    try:
        ctx = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"tls.ca {tls.ca}: not a usable PEM CA certificate ({_ssl_reason(exc)})") from None
    if tls.cert is not None:
        try:
            ctx.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None, password=_encrypted_key)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ValueError(f"tls.cert {tls.cert} / tls.key {tls.key}: cannot load the client certificate "
                             f"({_ssl_reason(exc)})") from None
    if tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# ---- request bodies -------------------------------------------------------------------------


event_json = encode_event   # the one encoding of an event (appliance/events/spool.py)


def _form_quote(name: str) -> str:
    # HTML's multipart/form-data encoding of names: ", CR and LF are percent-escaped.
    return name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def _content_type(value: str) -> str:
    value = value.strip()
    if not value or any(c in value for c in "\r\n\0") or "/" not in value:
        return "application/octet-stream"
    return value


def multipart_body(event_bytes: bytes, attachments: list[Attachment]) -> tuple[bytes, str]:
    """multipart/form-data: part `event` (application/json) first, then one part per attachment.
    Returns (body, Content-Type header value)."""
    while True:
        boundary = "appliance-" + secrets.token_hex(16)
        marker = boundary.encode()
        if marker not in event_bytes and not any(marker in a.data for a in attachments):
            break
    chunks = [b"--", marker, b"\r\n",
              b'Content-Disposition: form-data; name="event"\r\n',
              b"Content-Type: application/json\r\n\r\n", event_bytes, b"\r\n"]
    for a in attachments:
        name = _form_quote(a.name).encode()
        chunks += [b"--", marker, b"\r\n",
                   b'Content-Disposition: form-data; name="', name, b'"; filename="', name, b'"\r\n',
                   b"Content-Type: ", _content_type(a.content_type).encode(), b"\r\n\r\n", a.data, b"\r\n"]
    chunks += [b"--", marker, b"--\r\n"]
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


# ---- responses ------------------------------------------------------------------------------


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Retry-After as seconds from now: delay-seconds or an HTTP-date (RFC 9110 10.2.3);
    None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    now = now or dt.datetime.now(dt.UTC)
    return max(0.0, (when - now).total_seconds())


def _excerpt(body: bytes, reason: str) -> str:
    text = " ".join(body.decode("utf-8", "replace").split())
    if not text:
        return reason or "(empty body)"
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "..."


class HttpTransientError(TransientError):
    """Not delivered, retry later; status is the HTTP status (None for network errors/timeouts)."""

    def __init__(self, message: str, retry_after_s: float | None = None, status: int | None = None) -> None:
        super().__init__(message, retry_after_s)
        self.status = status


class HttpPermanentError(PermanentError):
    """The server refused the event (status, and the start of its reply in excerpt)."""

    def __init__(self, message: str, status: int | None = None, excerpt: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.excerpt = excerpt


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or exc.reason or str(exc)
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return getattr(exc, "strerror", None) or str(exc)


@dataclass
class _Reply:
    status: int
    reason: str
    headers: http.client.HTTPMessage
    body: bytes


class _Endpoint:
    """One URL and its keep-alive connection (requests on it are serialised)."""

    def __init__(self, url: str, context: ssl.SSLContext | None, timeout_s: float,
                 client_cert: bool = False) -> None:
        parts = urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # For messages and logs: no query string (it may carry a key).
        self.display = f"{parts.scheme}://{parts.netloc}{parts.path or '/'}"
        self.context = context
        self.client_cert = client_cert
        self.timeout_s = timeout_s
        self.lock = threading.Lock()
        self.conn: http.client.HTTPConnection | None = None
        self.exchanges = 0        # completed exchanges on the current connection

    @property
    def is_open(self) -> bool:
        return self.conn is not None and self.conn.sock is not None

    def drop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
        self.conn = None
        self.exchanges = 0

    def _open(self) -> None:
        if self.conn is None:
            if self.https:
                self.conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout_s,
                                                        context=self.context)
            else:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        if self.conn.sock is None:
            self.conn.connect()
            self.exchanges = 0

    def open(self) -> None:
        with self.lock:
            try:
                self._open()
            except (OSError, http.client.HTTPException) as exc:
                self.drop()
                raise self._failure(exc, "connect") from exc

    def abort(self) -> None:
        """Shut the socket down from any thread: a blocked exchange fails at once."""
        conn = self.conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def post(self, body: bytes, headers: dict[str, str]) -> _Reply:
        # Socket timeouts bound each read, not the exchange: a server dripping one byte a
        # second would never time out. A watchdog shuts the socket down at the deadline.
        with self.lock:
            # A little after the deadline: an ordinary read timeout says it better, first.
            watchdog = threading.Timer(self.timeout_s + WATCHDOG_GRACE_S, self.abort)
            watchdog.daemon = True
            watchdog.start()
            deadline = time.monotonic() + self.timeout_s
            try:
                return self._post(body, headers, deadline)
            except HttpTransientError as exc:
                if time.monotonic() >= deadline and exc.status is None:
                    raise HttpTransientError(f"timeout after {self.timeout_s:g} s talking to {self.display} "
                                             f"({exc})") from exc
                raise
            finally:
                watchdog.cancel()

    def _post(self, body: bytes, headers: dict[str, str], deadline: float) -> _Reply:
        for attempt in (1, 2):
            reused = self.is_open and self.exchanges > 0
            phase = "connect"
            try:
                self._set_timeout(deadline)   # no second attempt after the deadline
                self._open()
                phase = "send"
                self._set_timeout(deadline)
                self.conn.request("POST", self.target, body=body, headers=headers)
                phase = "response"
                self._set_timeout(deadline)
                resp = self.conn.getresponse()
                data = resp.read(RESPONSE_BODY_LIMIT)
                if not resp.isclosed():     # a longer reply than we care for: not reusable
                    self.drop()
                else:
                    self.exchanges += 1
                return _Reply(resp.status, resp.reason, resp.headers, data)
            except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError,
                    http.client.RemoteDisconnected, ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:
                self.drop()
                if reused and attempt == 1:
                    # The server closed the idle kept-alive connection: once more, fresh.
                    log.debug("%s: kept-alive connection was closed (%s); reconnecting", self.display, exc)
                    continue
                raise self._failure(exc, phase) from exc
            except (OSError, http.client.HTTPException) as exc:    # ssl errors and timeouts included
                self.drop()
                raise self._failure(exc, phase) from exc
            except BaseException:
                self.drop()     # the connection's state is unknown; not a network failure: raise it
                raise
        raise AssertionError("unreachable")

    def _set_timeout(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        if self.conn is not None and self.conn.sock is not None:
            self.conn.sock.settimeout(remaining)

    def _failure(self, exc: BaseException, phase: str) -> HttpTransientError:
        where = self.display
        if isinstance(exc, ssl.SSLCertVerificationError):
            if exc.verify_code in (2, 18, 19, 20, 21):   # issuer unknown / self-signed
                hint = "set tls.ca to the CA certificate that signed the server's certificate"
            elif exc.verify_code in (62, 64):            # host name / IP address mismatch
                hint = "the URL's host must be one the certificate names"
            elif exc.verify_code in (9, 10):             # not yet valid / expired
                hint = "check the certificate's dates and this gateway's clock"
            else:
                hint = "check the server's certificate"
            return HttpTransientError(f"TLS certificate verification failed for {where}: "
                                      f"{_ssl_reason(exc)} ({hint})")
        if isinstance(exc, ssl.SSLError):
            hint = ""
            if phase != "connect" and not self.client_cert:
                hint = (" (the server closed the TLS session after the handshake; if it requires a "
                        "client certificate, set tls.cert and tls.key)")
            return HttpTransientError(f"TLS error with {where}: {_ssl_reason(exc)}{hint}")
        if isinstance(exc, TimeoutError):
            doing = {"connect": "connecting", "send": "sending the request",
                     "response": "waiting for the response"}[phase]
            return HttpTransientError(f"timeout after {self.timeout_s:g} s {doing} to {where}")
        if isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                            ConnectionAbortedError)) and phase != "connect":
            return HttpTransientError(f"connection to {where} lost before a response: {exc}")
        if isinstance(exc, OSError):
            return HttpTransientError(f"cannot connect to {where}: {getattr(exc, 'strerror', None) or exc}"
                                      if phase == "connect" else
                                      f"network error with {where}: {getattr(exc, 'strerror', None) or exc}")
        if isinstance(exc, http.client.HTTPException):
            return HttpTransientError(f"malformed HTTP response from {where}: {exc!r}")
        return HttpTransientError(f"request to {where} failed: {exc!r}")


# ---- the transport --------------------------------------------------------------------------


class HttpTransport(Transport):
    """POSTs each event to config.url; see the module docstring and docs/uplink-http.md."""

    name = "http"

    def __init__(self, config: HttpConfig) -> None:
        self.config = config
        context = make_ssl_context(config.tls) if config.uses_https else None
        if config.tls.insecure_skip_verify:
            log.warning("http uplink: tls.insecure_skip_verify is set: the server's certificate is not checked")
        has_cert = config.tls.cert is not None
        self._events = _Endpoint(config.url, context, config.timeout_s, has_cert)
        self._health = _Endpoint(config.health_url or config.url, context, config.timeout_s, has_cert)
        self.omitted_attachments = 0      # attachments over max_attachment_bytes, not sent
        self.health_failures = 0
        self.last_health_error: str | None = None

    # -- Transport --

    def connect(self) -> None:
        self._events.open()

    @property
    def connected(self) -> bool:
        return self._events.is_open

    def send(self, event: dict[str, Any], attachments: list[Attachment]) -> int:
        event_id = event.get("id")
        if not isinstance(event_id, str) or not event_id:
            raise HttpPermanentError("event has no id: cannot send it with an Idempotency-Key")
        payload = event_json(event)
        sendable, omitted = [], []
        for a in attachments:
            (sendable if len(a.data) <= self.config.max_attachment_bytes else omitted).append(a)
        headers = self._headers("event")
        headers[IDEMPOTENCY_HEADER] = event_id
        if omitted:
            self.omitted_attachments += len(omitted)
            headers[OMITTED_HEADER] = ", ".join(_form_quote(a.name).replace(",", "%2C") for a in omitted)
            for a in omitted:
                log.warning("event %s: attachment %s (%d bytes) is over max_attachment_bytes (%d): "
                            "sending the event without it", event_id, a.name, len(a.data),
                            self.config.max_attachment_bytes)
        if sendable:
            body, headers["Content-Type"] = multipart_body(payload, sendable)
        else:
            body, headers["Content-Type"] = payload, "application/json"
        reply = self._events.post(body, headers)
        self._check(reply, self._events)
        return len(body)

    def publish_health(self, summary: dict[str, Any]) -> int:
        """POST the summary (JSON) to health_url, or to url with X-Appliance-Kind: health.
        Best effort: a failure is logged and counted (health_failures) and returns 0; the
        next summary goes out on schedule anyway."""
        body = json.dumps(summary, separators=(",", ":"), sort_keys=True).encode()
        headers = self._headers("health")
        headers["Content-Type"] = "application/json"
        try:
            self._check(self._health.post(body, headers), self._health)
        except (TransientError, PermanentError) as exc:
            self.health_failures += 1
            self.last_health_error = str(exc)
            log.warning("health summary not delivered: %s", exc)
            return 0
        self.last_health_error = None
        return len(body)

    def close(self) -> None:
        for endpoint in (self._events, self._health):
            endpoint.abort()          # a request stuck on a slow server gives up the lock now
            with endpoint.lock:
                endpoint.drop()

    # -- helpers --

    def _headers(self, kind: str) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT, KIND_HEADER: kind}
        headers.update(self.config.headers)
        if self.config.token_file is not None:
            headers["Authorization"] = f"Bearer {self._token()}"
        return headers

    def _token(self) -> str:
        path: Path = self.config.token_file   # type: ignore[assignment]
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise HttpTransientError(f"cannot read token_file {path}: {exc.strerror or exc}") from exc
        if not token or any(c.isspace() for c in token) or not token.isascii():
            raise HttpTransientError(f"token_file {path} must hold one token (ASCII, no spaces or line breaks)")
        return token

    @staticmethod
    def _check(reply: _Reply, endpoint: _Endpoint) -> None:
        status = reply.status
        if 200 <= status < 300:
            return
        excerpt = _excerpt(reply.body, reply.reason)
        message = f"HTTP {status} from {endpoint.display}: {excerpt}"
        retry_after = parse_retry_after(reply.headers.get("Retry-After"))
        if status in (408, 429) or 500 <= status < 600:
            if retry_after is not None:
                message += f" (Retry-After {retry_after:g} s)"
            raise HttpTransientError(message, retry_after_s=retry_after, status=status)
        if 300 <= status < 400:
            location = reply.headers.get("Location")
            message = (f"HTTP {status} from {endpoint.display}: redirects are not followed"
                       + (f"; set the URL to {location}" if location else "") + f" ({excerpt})")
        if 300 <= status < 500:
            raise HttpPermanentError(message, status=status, excerpt=excerpt)
        # 1xx as a final answer or beyond 599: a broken server; try again later.
        raise HttpTransientError(message, retry_after_s=retry_after, status=status)
