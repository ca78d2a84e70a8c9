"""MQTT uplink (paho-mqtt 2, MQTT 5 or 3.1.1, QoS 1). Topic layout and payloads: docs/uplink-mqtt.md.

    <prefix>/<gateway>/status                                 retained online/offline (last will)
    <prefix>/<gateway>/health                                 retained health summary
    <prefix>/<gateway>/events/<source>                        one event: its JSON exactly as spooled
    <prefix>/<gateway>/events/<source>/<event id>/<name>      an attachment's bytes
    <prefix>/<gateway>/fleet/...                              the fleet channel (appliance/deploy/channel.py)

send() publishes the attachments, waits for their PUBACKs, then publishes the event and waits
for its PUBACK; any disconnect or missing PUBACK is a TransientError and the forwarder sends
the same event (same id) again: duplicates are possible, loss is not.

Subscriptions (listen()) are made on every connection. A filter the SUBACK refuses (0x80) is
subscribed again on the same connection after 1 s, 2 s, 4 s, then every 5 s until it is granted:
a clustered broker refuses them while it elects new leaders after losing a node (NATS 2.9: the
JetStream consumer behind the subscription was not made in time), an ACL until it is fixed.
Events keep flowing meanwhile.

MQTT 5 where the broker speaks it (protocol: auto): the session outlives a disconnect by
SESSION_EXPIRY_S, and a message that asks for an answer (a Response Topic, MQTT 5's request and
response) reaches the listener with that topic and its Correlation Data. A broker that answers an
MQTT 5 CONNECT with "unsupported protocol version" (NATS 2.9) is spoken to in 3.1.1 from then on.
"""
from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import AfterValidator, Field, field_validator, model_validator

from appliance.events.record import Attachment, iso_time
from appliance.uplink.transport import TransientError, Transport
from hal.schema import ConfigPath, ExistingFile, StrictModel

log = logging.getLogger("appliance.uplink.mqtt")

QOS = 1
SUBSCRIBE_RETRY_S = 1.0       # a refused subscription is tried again after this, doubling per refusal
SUBSCRIBE_RETRY_MAX_S = 5.0
# MQTT 5: how long the broker keeps the session (subscriptions, queued QoS 1 messages) after the
# connection ends. MQTT 3.1.1 has no bound; a week covers a gateway off over a long weekend
# without the broker holding sessions of gateways taken out of service forever.
SESSION_EXPIRY_S = 7 * 24 * 3600
UNSUPPORTED_PROTOCOL_VERSION = 132   # CONNACK: MQTT 5's 0x84 (3.1.1's return code 1, as paho reports it)


@dataclass(frozen=True)
class Request:
    """An MQTT 5 message's request properties: where its answer goes (Response Topic) and the
    bytes that tie the answer to it (Correlation Data, empty if none was given)."""
    response_topic: str
    correlation: bytes


class MqttTls(StrictModel):
    ca: ExistingFile | None = Field(None, description="PEM CA bundle that signed the broker's certificate "
                                    "(default: the system's trust store)")
    cert: ExistingFile | None = Field(None, description="client certificate (PEM), for brokers that require one")
    key: ExistingFile | None = Field(None, description="the client certificate's private key (PEM)")
    insecure_skip_verify: bool = Field(False, description="do not verify the broker's certificate or name "
                                       "(testing only: anyone can impersonate the broker)")
    server_name: str | None = Field(None, min_length=1, description="the name the broker's certificate must "
                                    "carry (and the TLS SNI), when it differs from host, e.g. connecting by IP")

    @model_validator(mode="after")
    def _pair(self):
        if (self.cert is None) != (self.key is None):
            raise ValueError("give both tls.cert and tls.key (a client certificate and its key), or neither")
        if self.cert is not None:   # a key that does not match the certificate fails here, not at connect
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(str(self.cert), str(self.key))
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"cannot use tls.cert {self.cert} with tls.key {self.key}: {exc}") from exc
        return self


def _host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: write host:port, e.g. broker2.plant:1883")
    return text


class MqttConfig(StrictModel):
    host: str = Field(min_length=1, description="broker host name or address")
    port: int = Field(None, ge=1, le=65535, description="default 1883, or 8883 with tls")  # type: ignore[assignment]
    also: list[Annotated[str, AfterValidator(_host_port)]] = Field(
        [], description="other nodes of a clustered broker, as host:port: after a failed connect the next one "
                        "is tried (in turn, host first)")
    client_id: str | None = Field(None, min_length=1, max_length=65535,
                                  description="stable MQTT client id (default: the gateway name), so the broker "
                                  "keeps the session")
    username: str | None = Field(None, min_length=1)
    password: str | None = Field(None, description="prefer password_file: keeps the secret out of the YAML")
    password_file: ConfigPath | None = Field(None, description="file holding the password (one line; read at "
                                             "each connect, so it can be rotated)")
    tls: MqttTls | None = None
    topic_prefix: str = Field("factory", min_length=1, description="first topic level(s), e.g. factory or "
                              "plant1/line3")
    keepalive_s: int = Field(30, ge=1, le=65535, description="MQTT keepalive; the broker publishes the last "
                             "will about 1.5 x this after the link goes silent")
    connect_timeout_s: float = Field(10.0, gt=0, description="TCP + TLS + CONNACK")
    ack_timeout_s: float = Field(10.0, gt=0, description="longest wait for each PUBACK before the send fails "
                                 "(and is retried)")
    max_attachment_bytes: int = Field(256 * 1024, ge=0, description="larger attachments are not sent (logged "
                                      "and counted); the event still lists them")
    protocol: Literal["auto", "5", "3.1.1"] = Field("auto", description="MQTT version: auto tries 5 and falls "
                                                    "back to 3.1.1 on a broker that refuses it (NATS 2.9)")

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @model_validator(mode="before")
    @classmethod
    def _default_port(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("port") is None:
            data = {**data, "port": 8883 if data.get("tls") is not None else 1883}
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if (self.password is not None or self.password_file is not None) and self.username is None:
            raise ValueError("a password needs a username")
        if any(c in self.topic_prefix for c in "+#\0") or self.topic_prefix.startswith("/") \
                or self.topic_prefix.endswith("/"):
            raise ValueError(f"topic_prefix {self.topic_prefix!r}: no wildcards (+ #) and no leading or "
                             "trailing /")
        return self


def session_client(client_id: str, protocol: str) -> mqtt.Client:
    """A paho client whose session the broker keeps: MQTT 3.1.1 clean_session=False; MQTT 5 has
    no clean_session (connect it with session_connect, which asks for clean_start=False and a
    session expiry). Shared by the gateway's transport and the operator's tool."""
    if protocol == "5":
        return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                           reconnect_on_failure=False)
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                       protocol=mqtt.MQTTv311, reconnect_on_failure=False)


def session_connect(client: mqtt.Client, protocol: str, host: str, port: int, keepalive: int,
                    expiry_s: int) -> None:
    """client.connect for a session_client: on MQTT 5 the session outlives the connection by expiry_s."""
    if protocol == "5":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = expiry_s
        client.connect(host, port, keepalive=keepalive, clean_start=False, properties=props)
    else:
        client.connect(host, port, keepalive=keepalive)


def refused_filters(filters, reason_codes) -> list[str]:
    """The filters a SUBACK refused (a failure code, or none given for them), in order."""
    codes = list(reason_codes)
    return [f for i, f in enumerate(filters) if i >= len(codes) or codes[i].is_failure]


def topic_level(name: str) -> str:
    """One topic level from a name: '/', '+', '#', '%' and NUL are %-escaped (%2F, %2B, %23, %25,
    %00), so a name can neither add levels nor act as a wildcard. Ordinary names are unchanged."""
    return "".join(f"%{ord(c):02X}" if c in "/+#%\0" else c for c in name)


def encode_event(event: dict[str, Any]) -> bytes:
    """The event's JSON exactly as the spool stores it (sorted keys, compact, ASCII-safe UTF-8)."""
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode("utf-8")


# CONNACK refusals in words (paho reports MQTT 3.1.1 return codes as their MQTT 5 reason codes).
_REFUSALS = {
    128: "unspecified error",
    129: "malformed packet",
    130: "protocol error",
    131: "implementation specific error",
    132: "unsupported protocol version",
    133: "client identifier rejected",
    134: "not authorized: bad username or password",
    135: "not authorized",
    136: "server unavailable",
    137: "server busy",
    138: "banned",
    140: "bad authentication method",
    144: "topic name invalid",
    149: "packet too large",
    151: "quota exceeded",
    153: "payload format invalid",
    154: "retain not supported",
    155: "QoS not supported",
    156: "use another server",
    157: "server moved",
    159: "connection rate exceeded",
}


class _Connection:
    """State of one network connection (one paho client); callbacks of an old client cannot touch a
    newer one."""

    def __init__(self, client: mqtt.Client, protocol: str) -> None:
        self.client = client
        self.protocol = protocol             # "5" or "3.1.1"
        self.settled = threading.Event()     # CONNACK arrived or the connection ended first
        self.lost = threading.Event()        # the connection ended (or we ended it)
        self.ended = threading.Event()       # paho reported the disconnect
        self.refused: int | None = None      # CONNACK reason code, if refused
        self.last_error = ""                 # paho's last error log line (e.g. a TLS alert)
        self.status: bool | None = None      # last status published on this connection
        self.sub_lock = threading.Lock()
        self.subscribing: dict[int, tuple[str, ...]] = {}   # SUBSCRIBE packet id -> its filters, until the SUBACK
        self.refused_filters: set[str] = set()   # filters a SUBACK refused: subscribed again later
        self.retry_s = SUBSCRIBE_RETRY_S
        self.retry: threading.Timer | None = None


class MqttTransport(Transport):
    name = "mqtt"

    def __init__(self, config: MqttConfig, gateway: str) -> None:
        if not gateway:
            raise ValueError("the gateway name is needed (topics and default client id)")
        self.config = config
        self.gateway = gateway
        self.client_id = config.client_id or gateway
        base = f"{config.topic_prefix}/{topic_level(gateway)}"
        self.status_topic = f"{base}/status"
        self.health_topic = f"{base}/health"
        self.events_base = f"{base}/events"
        self.endpoints = [(config.host, config.port)] + [(h, int(p)) for h, _, p in (a.rpartition(":")
                                                                                     for a in config.also)]
        self._endpoint_index = 0
        self.endpoint = f"{config.host}:{config.port}"
        self._listeners: list[tuple[tuple[str, ...], Callable[[str, bytes], None], Callable[[], None] | None]] = []
        self.bytes_sent = 0            # payload bytes acknowledged by the broker (events, attachments, health,
        self.attachments_skipped = 0   # status); attachments over max_attachment_bytes, not sent
        self.subscriptions_refused = 0   # filters a SUBACK refused (each is subscribed again later)
        self.protocol: str | None = None   # "5" or "3.1.1": what the current (or last) connection speaks
        self._speaks_311_only: set[tuple[str, int]] = set()   # endpoints that refused MQTT 5 (auto)
        self._lock = threading.Lock()
        self._conn: _Connection | None = None

    # ---- topics and payloads ----------------------------------------------------------------------

    def event_topic(self, event: dict[str, Any]) -> str:
        return f"{self.events_base}/{topic_level(str(event['source']))}"

    def attachment_topic(self, event: dict[str, Any], name: str) -> str:
        return f"{self.event_topic(event)}/{topic_level(str(event['id']))}/{topic_level(name)}"

    def _status_payload(self, online: bool, reason: str | None = None, stamp: bool = True) -> bytes:
        doc: dict[str, Any] = {"gateway": self.gateway, "state": "online" if online else "offline"}
        if reason:
            doc["reason"] = reason
        if stamp:
            doc["time"] = iso_time(time.time_ns())
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    # ---- connection -------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        conn = self._conn
        return conn is not None and conn.settled.is_set() and conn.refused is None and not conn.lost.is_set()

    @property
    def subscribed(self) -> bool:
        """Connected, and the broker granted every listen() filter on this connection."""
        conn = self._conn
        if not self.connected or conn is None:
            return False
        with conn.sub_lock:
            return not conn.subscribing and not conn.refused_filters

    def connect(self) -> None:
        """A fresh connection (any previous one is closed first); returns once the broker accepted it
        and the retained online status is acknowledged. Raises TransientError with the reason."""
        self._drop(graceful=True)
        host, port = self.endpoints[self._endpoint_index]
        self.endpoint = f"{host}:{port}"
        try:
            self._connect(host, port)
        except TransientError:
            # A clustered broker: the next attempt goes to the next node.
            self._endpoint_index = (self._endpoint_index + 1) % len(self.endpoints)
            raise
        for topics, _, on_connected in self._listeners:
            self._subscribe(topics)
            if on_connected is not None:
                on_connected()

    def listen(self, topics: list[str], on_message: Callable[[str, bytes, Request | None], None],
               on_connected: Callable[[], None] | None = None) -> None:
        """Subscribe (QoS 1) to `topics` on every connection; on_message(topic, payload, request)
        runs on paho's network thread (hand the work over, do not block it); request is the
        message's MQTT 5 Response Topic and Correlation Data, None when it asks for no answer (and
        always on MQTT 3.1.1). on_connected after each connect. Call before the forwarder starts."""
        self._listeners.append((tuple(topics), on_message, on_connected))

    def _subscribe(self, topics: tuple[str, ...]) -> None:
        conn = self._live()
        # Under the lock: the SUBACK (paho's thread) must find its packet id.
        with conn.sub_lock:
            rc, mid = conn.client.subscribe([(t, QOS) for t in topics])
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                conn.subscribing[mid] = tuple(topics)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransientError(f"MQTT subscribe to {', '.join(topics)} failed: {mqtt.error_string(rc)}")

    def _on_subscribe(self, conn: _Connection, mid: int, reason_codes) -> None:
        """paho's thread: the SUBACK. Refused filters (0x80, or missing from it) are subscribed
        again later on this connection: a SUBSCRIBE is not retried by MQTT itself, and without it
        the connection looks healthy while nothing arrives on those topics."""
        with conn.sub_lock:
            topics = conn.subscribing.pop(mid, None)
            if topics is None:
                return
            codes = list(reason_codes)
            refused = refused_filters(topics, codes)
            was_refused = bool(conn.refused_filters)
            conn.refused_filters.difference_update(topics)
            conn.refused_filters.update(refused)
            if not refused:
                if was_refused and not conn.refused_filters:
                    log.info("MQTT broker %s granted the subscriptions it had refused", self.endpoint)
                    conn.retry_s = SUBSCRIBE_RETRY_S
                return
            self.subscriptions_refused += len(refused)
            first = not was_refused
            delay = conn.retry_s
            conn.retry_s = min(conn.retry_s * 2, SUBSCRIBE_RETRY_MAX_S)
            if conn.retry is None and not conn.lost.is_set():
                conn.retry = threading.Timer(delay, self._subscribe_refused, (conn,))
                conn.retry.daemon = True
                conn.retry.start()
        log.log(logging.WARNING if first else logging.DEBUG,   # once, not every few seconds
                "MQTT broker %s refused the subscription to %s (SUBACK %s); subscribing again in %.0f s",
                self.endpoint, ", ".join(refused), [c.value for c in codes], delay)

    def _subscribe_refused(self, conn: _Connection) -> None:
        """A timer's thread: subscribe again to what the broker refused, if this connection lives."""
        with conn.sub_lock:
            conn.retry = None
            topics = tuple(sorted(conn.refused_filters))
        if not topics or conn.lost.is_set() or self._conn is not conn:
            return
        try:
            self._subscribe(topics)
        except TransientError as exc:   # the connection is going: the next one subscribes to everything
            log.debug("MQTT: subscribing again failed: %s", exc)

    def _on_message(self, message) -> None:
        request = None
        props = getattr(message, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        if response_topic:
            request = Request(str(response_topic), bytes(getattr(props, "CorrelationData", b"") or b""))
        for topics, on_message, _ in self._listeners:
            if any(mqtt.topic_matches_sub(t, message.topic) for t in topics):
                try:
                    on_message(message.topic, bytes(message.payload), request)
                except Exception:   # a listener's bug must not end paho's network thread
                    log.exception("MQTT: handling a message on %s failed", message.topic)

    def publish_retained(self, topic: str, payload: bytes) -> None:
        """A retained message (QoS 1), acknowledged; TransientError if not connected or not acked."""
        conn = self._live()
        self._await(conn, [(topic, self._publish(conn, topic, payload, retain=True))])
        self.bytes_sent += len(payload)

    def answer(self, request: Request, payload: bytes) -> None:
        """The answer to an MQTT 5 request: to its Response Topic with its Correlation Data, QoS 1,
        not retained, acknowledged. TransientError if not connected or not acked."""
        conn = self._live()
        if conn.protocol != "5":   # the request came on an MQTT 5 connection that has since gone
            raise TransientError(f"cannot answer on {request.response_topic}: this connection speaks MQTT "
                                 f"{conn.protocol}")
        props = Properties(PacketTypes.PUBLISH)
        if request.correlation:
            props.CorrelationData = request.correlation
        self._await(conn, [(request.response_topic,
                            self._publish(conn, request.response_topic, payload, properties=props))])
        self.bytes_sent += len(payload)

    def _connect(self, host: str, port: int) -> None:
        wanted = self.config.protocol
        if wanted == "auto":
            wanted = "3.1.1" if (host, port) in self._speaks_311_only else "5"
        try:
            self._connect_as(host, port, wanted)
        except _ProtocolRefused:
            if self.config.protocol != "auto":
                raise TransientError(f"MQTT broker {self.endpoint} refused the connection: it does not speak "
                                     f"MQTT {wanted} (set uplink.mqtt.protocol: auto)") from None
            log.info("MQTT broker %s does not speak MQTT 5: speaking 3.1.1 to it", self.endpoint)
            self._speaks_311_only.add((host, port))
            self._connect_as(host, port, "3.1.1")

    def _connect_as(self, host: str, port: int, protocol: str) -> None:
        cfg = self.config
        v5 = protocol == "5"
        client = session_client(self.client_id, protocol)
        conn = _Connection(client, protocol)
        client.connect_timeout = cfg.connect_timeout_s
        if cfg.username is not None:
            client.username_pw_set(cfg.username, self._password())
        ctx = self._tls_context() if cfg.tls is not None else None
        if ctx is not None:
            client.tls_set_context(ctx)
        # The broker publishes this if the connection ends without a DISCONNECT (crash, power cut,
        # network gone for 1.5 x keepalive). No time in it: it was written at connect time.
        client.will_set(self.status_topic, self._status_payload(False, "lost", stamp=False), qos=QOS, retain=True)
        client.on_connect = lambda c, u, flags, rc, props: self._on_connect(conn, rc)
        client.on_disconnect = lambda c, u, flags, rc, props: self._on_disconnect(conn, rc)
        client.on_log = lambda c, u, level, buf: self._on_log(conn, level, buf)
        if self._listeners:
            client.on_message = lambda c, u, message: self._on_message(message)
            client.on_subscribe = lambda c, u, mid, codes, props: self._on_subscribe(conn, mid, codes)
        try:
            try:
                session_connect(client, protocol, host, port, cfg.keepalive_s, SESSION_EXPIRY_S)
            except BaseException:
                if ctx is not None and ctx.wrapped is not None:   # a failed handshake leaves it open
                    ctx.wrapped.close()
                client.on_connect = client.on_disconnect = client.on_log = client.on_message = None   # no reference cycle
                client.on_subscribe = None
                raise
        except ssl.SSLCertVerificationError as exc:
            raise TransientError(f"MQTT broker {self.endpoint}: TLS certificate verification failed: "
                                 f"{exc.verify_message or exc.reason} (check tls.ca and tls.server_name)") from exc
        except ssl.CertificateError as exc:   # paho's own host name check (older Pythons)
            raise TransientError(f"MQTT broker {self.endpoint}: TLS certificate does not match: {exc}") from exc
        except ssl.SSLError as exc:
            raise TransientError(f"MQTT broker {self.endpoint}: TLS handshake failed: {exc.reason or exc}"
                                 f"{self._tls_hint(str(exc))}") from exc
        except ConnectionRefusedError as exc:
            raise TransientError(f"MQTT broker {self.endpoint} is unreachable: connection refused "
                                 "(nothing listening)") from exc
        except TimeoutError as exc:   # socket.timeout is TimeoutError
            raise TransientError(f"MQTT broker {self.endpoint} is unreachable: no answer within "
                                 f"{cfg.connect_timeout_s:g} s") from exc
        except socket.gaierror as exc:
            raise TransientError(f"MQTT broker {self.endpoint}: cannot resolve {host!r}: {exc.strerror}") from exc
        except OSError as exc:
            raise TransientError(f"MQTT broker {self.endpoint} is unreachable: {exc.strerror or exc}") from exc
        client.loop_start()
        with self._lock:
            self._conn = conn
        if not conn.settled.wait(cfg.connect_timeout_s):
            self._drop(graceful=False)
            raise TransientError(f"MQTT broker {self.endpoint} did not answer CONNECT within "
                                 f"{cfg.connect_timeout_s:g} s")
        if conn.refused is not None:
            self._drop(graceful=False)
            if v5 and conn.refused == UNSUPPORTED_PROTOCOL_VERSION:
                raise _ProtocolRefused()
            words = _REFUSALS.get(conn.refused, f"reason code {conn.refused}")
            raise TransientError(f"MQTT broker {self.endpoint} refused the connection: {words}")
        if conn.lost.is_set():
            detail = conn.last_error or "connection closed"
            self._drop(graceful=False)
            raise TransientError(f"MQTT broker {self.endpoint} closed the connection before accepting it: "
                                 f"{detail}{self._tls_hint(detail)}")
        self.protocol = protocol
        try:
            self._publish_status(conn, True)
        except TransientError:
            self._drop(graceful=False)
            raise
        log.info("MQTT connected to %s as %s (MQTT %s)", self.endpoint, self.client_id, protocol)

    def close(self) -> None:
        """Says offline (unless this connection already did) and disconnects cleanly."""
        self._drop(graceful=True)

    def _drop(self, graceful: bool) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is None:
            return
        client = conn.client
        live = conn.settled.is_set() and conn.refused is None and not conn.lost.is_set()
        if graceful and live and conn.status is not False:
            try:
                self._publish_status(conn, False, reason="closed", timeout_s=min(2.0, self.config.ack_timeout_s))
            except TransientError:
                pass
        conn.lost.set()   # from here on, waiters give up and a disconnect is no news
        with conn.sub_lock:
            if conn.retry is not None:
                conn.retry.cancel()
                conn.retry = None
        if graceful and live:
            client.disconnect()   # a clean DISCONNECT: the broker discards the last will
            conn.ended.wait(1.0)
        if not conn.ended.is_set():
            # Not ended cleanly (or a hung broker never let the DISCONNECT out): cut the TCP connection
            # so paho's network thread ends now rather than after a keepalive timeout. The raw socket
            # shutdown leaves the descriptor (and an SSL object in use by that thread) alone.
            sock = client.socket()
            if isinstance(sock, socket.socket):
                try:
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass
        client.loop_stop()
        sock = client.socket()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
        # Break the client <-> callbacks cycle so the client is freed (and closes its internal socket
        # pair) as soon as nothing refers to it.
        client.on_connect = client.on_disconnect = client.on_log = client.on_message = None
        client.on_subscribe = None

    def _password(self) -> str | None:
        cfg = self.config
        if cfg.password_file is not None:
            try:
                return cfg.password_file.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise TransientError(f"cannot read MQTT password_file {cfg.password_file}: "
                                     f"{exc.strerror or exc}") from exc
        return cfg.password

    def _tls_context(self) -> ssl.SSLContext:
        tls = self.config.tls
        assert tls is not None
        ctx = _NamedSSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.server_name = tls.server_name
        if tls.insecure_skip_verify:
            log.warning("MQTT broker %s: tls.insecure_skip_verify is set: its certificate is not verified",
                        self.endpoint)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif tls.ca is not None:
            ctx.load_verify_locations(cafile=str(tls.ca))
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if tls.cert is not None:
            try:
                ctx.load_cert_chain(str(tls.cert), str(tls.key))
            except (ssl.SSLError, OSError) as exc:
                raise TransientError(f"cannot load the MQTT client certificate {tls.cert} / key {tls.key}: "
                                     f"{exc}") from exc
        return ctx

    def _tls_hint(self, text: str) -> str:
        """A likely cause for a connection the broker ended before accepting it."""
        text = text.lower()
        tls = self.config.tls
        if tls is None:
            return " (does the broker expect TLS on this port? then set tls)" if "reset" in text or "eof" in text \
                else ""
        if "certificate required" in text or (tls.cert is None and ("eof" in text or "reset" in text
                                                                        or "handshake failure" in text)):
            return " (does the broker require a client certificate? then set tls.cert and tls.key)"
        if "unknown ca" in text or "bad certificate" in text or "certificate unknown" in text:
            return " (the broker did not accept the client certificate)"
        return ""

    # ---- paho callbacks (its network thread) ------------------------------------------------------

    def _on_connect(self, conn: _Connection, reason_code) -> None:
        if reason_code.is_failure:
            conn.refused = reason_code.value
            conn.lost.set()
        conn.settled.set()

    def _on_disconnect(self, conn: _Connection, reason_code) -> None:
        if not conn.lost.is_set() and conn.settled.is_set() and conn.refused is None:
            log.warning("MQTT connection to %s lost: %s", self.endpoint, conn.last_error or reason_code)
        conn.lost.set()
        conn.ended.set()
        conn.settled.set()

    def _on_log(self, conn: _Connection, level: int, buf: str) -> None:
        if level in (mqtt.MQTT_LOG_ERR, mqtt.MQTT_LOG_WARNING) and not conn.last_error:
            conn.last_error = buf   # the first one is the cause; later ones are consequences
        log.debug("paho: %s", buf)

    # ---- publishing -------------------------------------------------------------------------------

    def _live(self) -> _Connection:
        conn = self._conn
        if conn is None or not conn.settled.is_set() or conn.refused is not None or conn.lost.is_set():
            raise TransientError(f"not connected to MQTT broker {self.endpoint}")
        return conn

    def _publish(self, conn: _Connection, topic: str, payload: bytes, retain: bool = False,
                 properties: Properties | None = None) -> mqtt.MQTTMessageInfo:
        info = conn.client.publish(topic, payload, qos=QOS, retain=retain, properties=properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            # NO_CONN: the connection ended between our check and the publish.
            raise TransientError(f"MQTT publish to {topic} failed: {mqtt.error_string(info.rc)}")
        return info

    def _await(self, conn: _Connection, infos: list[tuple[str, mqtt.MQTTMessageInfo]],
               timeout_s: float | None = None) -> None:
        """Block until every message is acknowledged (PUBACK); each gets timeout_s from the moment the
        previous one was acknowledged, so a slow but moving link is not cut short."""
        timeout_s = self.config.ack_timeout_s if timeout_s is None else timeout_s
        for topic, info in infos:
            deadline = time.monotonic() + timeout_s
            while not info.is_published():
                if conn.lost.is_set():
                    raise TransientError(f"MQTT connection to {self.endpoint} lost before the PUBACK for {topic}"
                                         + (f": {conn.last_error}" if conn.last_error else ""))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransientError(f"no PUBACK from MQTT broker {self.endpoint} within {timeout_s:g} s "
                                         f"for {topic}")
                info.wait_for_publish(min(left, 0.05))

    def send(self, event: dict[str, Any], attachments: list[Attachment]) -> int:
        conn = self._live()
        payload = encode_event(event)
        limit = self.config.max_attachment_bytes
        sent = 0
        pending = []
        for a in attachments:
            if len(a.data) <= limit:
                topic = self.attachment_topic(event, a.name)
                pending.append((topic, self._publish(conn, topic, a.data)))
                sent += len(a.data)
        # Evidence first, acknowledged, so that a consumer that sees the event can already find it.
        self._await(conn, pending)
        topic = self.event_topic(event)
        self._await(conn, [(topic, self._publish(conn, topic, payload))])
        sent += len(payload)
        self.bytes_sent += sent
        # Counted once the event is delivered, so retries of the same event do not count it again.
        for a in attachments:
            if len(a.data) > limit:
                self.attachments_skipped += 1
                log.warning("event %s: attachment %s not sent: %d bytes, over max_attachment_bytes %d",
                            event.get("id"), a.name, len(a.data), limit)
        return sent

    def _publish_status(self, conn: _Connection, online: bool, reason: str | None = None,
                        timeout_s: float | None = None) -> None:
        payload = self._status_payload(online, reason)
        self._await(conn, [(self.status_topic, self._publish(conn, self.status_topic, payload, retain=True))],
                    timeout_s)
        conn.status = online
        self.bytes_sent += len(payload)

    def publish_status(self, online: bool) -> None:
        """Retained status; connect() already announced online, so online again is a no-op. Offline
        (a planned stop) says reason "stopped"."""
        conn = self._live()
        if conn.status is online:
            return
        self._publish_status(conn, online, None if online else "stopped")

    def publish_health(self, summary: dict[str, Any]) -> int:
        """Retained health summary (QoS 1, acknowledged); `gateway` and `time` are added unless the
        summary has them. Raises TransientError like send()."""
        conn = self._live()
        doc = {"gateway": self.gateway, "time": iso_time(time.time_ns()), **summary}
        payload = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode("utf-8")
        self._await(conn, [(self.health_topic, self._publish(conn, self.health_topic, payload, retain=True))])
        self.bytes_sent += len(payload)
        return len(payload)


class _ProtocolRefused(Exception):
    """The broker answered an MQTT 5 CONNECT with 'unsupported protocol version'."""


class _NamedSSLContext(ssl.SSLContext):
    """Verifies (and sends as SNI) tls.server_name instead of the host paho connects to."""
    server_name: str | None = None
    wrapped: ssl.SSLSocket | None = None   # the socket paho is handshaking with (closed if that fails)

    def wrap_socket(self, sock, *args, server_hostname=None, **kwargs):  # type: ignore[override]
        self.wrapped = super().wrap_socket(sock, *args, server_hostname=self.server_name or server_hostname,
                                           **kwargs)
        return self.wrapped
