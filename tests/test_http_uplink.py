"""The HTTP(S) webhook transport against a real local HTTP server (tests/webhook_server.py):
request formats, status handling (what retries, what parks), timeouts, TLS, tokens."""
from __future__ import annotations

import datetime as dt
import email.parser
import email.policy
import email.utils
import hashlib
import json
import logging
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pydantic
import pytest
from webhook_server import Reply, WebhookServer, make_test_pki, parse_multipart

from appliance.events.record import Attachment, make_event

from appliance.events.spool import Spool
from appliance.uplink.http import (
    HttpConfig,
    HttpPermanentError,
    HttpTransport,
    event_json,
    parse_retry_after,
)
from appliance.uplink.transport import PermanentError, TransientError
from hal.drivers.camera.jpeg import jpeg_snapshot

REPO = Path(__file__).resolve().parents[1]


def _event(**kw):
    args = {"gateway": "gw-test-01", "source": "spindle", "module": "spindle_stats", "severity": 3,
            "score": 107.74,
            "message": "vibration anomaly: ch0 peak 0.5829 vs baseline 0.0818 (score 107.7) – ünïcode",
            "window": {"seq": 128, "start": "2026-11-21T11:37:30.161Z", "frames": 4096,
                       "sample_rate": 12800.0, "channels": ["x", "y", "z"]},
            "features": {"ch0.rms": 0.118, "ch0.peak": 0.583, "score": 107.74}}
    args.update(kw)
    return make_event(**args)


def _jpeg() -> bytes:
    y, x = np.mgrid[0:120, 0:160]
    gray = ((x * 2 + y) % 256).astype(np.uint8).reshape(1, -1)
    return jpeg_snapshot(gray, (120, 160), [(20, 30, 40, 50)])


@pytest.fixture
def server():
    with WebhookServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


_open_transports: list[HttpTransport] = []


@pytest.fixture(autouse=True)
def _close_transports():
    yield
    while _open_transports:
        _open_transports.pop().close()


def _transport(url: str, **kw) -> HttpTransport:
    transport = HttpTransport(HttpConfig(url=url, **kw))
    _open_transports.append(transport)
    return transport


# ---- request formats --------------------------------------------------------------------------


def test_json_body_is_the_stored_event_bytes(server, tmp_path):
    import jsonschema
    spool = Spool(tmp_path / "spool.db", max_bytes=1 << 20)
    spool.append(_event())
    stored = sqlite3.connect(tmp_path / "spool.db").execute("SELECT body FROM events").fetchone()[0]
    spool.close()
    event = json.loads(stored)       # what a forwarder reading the spool hands over

    transport = _transport(server.url)
    sent = transport.send(event, [])
    (req,) = server.wait_for(1)
    assert req.method == "POST" and req.path == "/hook"
    assert req.body == stored.encode()
    assert sent == len(req.body)
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["Idempotency-Key"] == event["id"]
    assert req.headers["X-Appliance-Kind"] == "event"
    assert req.headers["User-Agent"].startswith("factory-gateway-appliance")
    schema = json.loads((REPO / "docs" / "event.schema.json").read_text())
    jsonschema.validate(json.loads(req.body), schema)
    transport.close()


def test_multipart_carries_the_jpeg_and_the_event_lists_its_sha256(server):
    jpeg = _jpeg()
    raw = b"--not-the-boundary\r\n\r\n" + bytes(range(256)) * 8   # binary with CRLFs and dashes
    attachments = [Attachment("snapshot.jpg", "image/jpeg", jpeg),
                   Attachment("window.f32", "application/octet-stream", raw)]
    event = _event(attachments=attachments)
    transport = _transport(server.url)
    sent = transport.send(event, attachments)
    (req,) = server.wait_for(1)
    assert sent == len(req.body)
    assert req.headers["Idempotency-Key"] == event["id"]
    assert req.headers["Content-Type"].startswith("multipart/form-data; boundary=")

    assert [p.name for p in req.parts] == ["event", "snapshot.jpg", "window.f32"]
    assert req.part("event").content_type == "application/json"
    assert req.part("event").data == event_json(event)
    listed = {a["name"]: a for a in json.loads(req.part("event").data)["attachments"]}
    for a in attachments:
        part = req.part(a.name)
        assert part.filename == a.name and part.content_type == a.content_type
        assert part.data == a.data
        assert hashlib.sha256(part.data).hexdigest() == listed[a.name]["sha256"]
        assert len(part.data) == listed[a.name]["size"]
    import cv2
    assert cv2.imdecode(np.frombuffer(req.part("snapshot.jpg").data, np.uint8), cv2.IMREAD_COLOR) is not None

    # An independent parser (the email package) reads the same parts.
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + req.headers["Content-Type"].encode() + b"\r\n\r\n" + req.body)
    got = [(p.get_param("name", header="content-disposition"), p.get_payload(decode=True))
           for p in msg.iter_parts()]
    assert got == [("event", event_json(event)), ("snapshot.jpg", jpeg), ("window.f32", raw)]


def test_attachment_over_the_limit_is_left_out_and_named(server, caplog):
    small, big = Attachment("a.bin", "application/octet-stream", b"x" * 100), \
        Attachment("snapshot.jpg", "image/jpeg", b"y" * 5000)
    event = _event(attachments=[small, big])
    transport = _transport(server.url, max_attachment_bytes=1000)
    transport.send(event, [small, big])
    (req,) = server.wait_for(1)
    assert [p.name for p in req.parts] == ["event", "a.bin"]
    assert req.headers["X-Appliance-Attachments-Omitted"] == "snapshot.jpg"
    assert transport.omitted_attachments == 1
    assert "over max_attachment_bytes" in caplog.text

    only_big = _event(attachments=[big])
    transport.send(only_big, [big])       # nothing left to attach: plain JSON
    req = server.wait_for(2)[1]
    assert req.headers["Content-Type"] == "application/json" and req.body == event_json(only_big)
    assert req.headers["X-Appliance-Attachments-Omitted"] == "snapshot.jpg"


def test_keep_alive_reuses_one_connection_and_reconnects_when_the_server_closed_it(server, caplog):
    caplog.set_level(logging.DEBUG, logger="appliance.uplink.http")
    transport = _transport(server.url)
    transport.connect()
    assert transport.connected
    transport.send(_event(), [])
    transport.send(_event(), [])
    first, second = server.wait_for(2)
    assert first.client_port == second.client_port          # one kept-alive connection

    server.drop_connections()                               # the server closes the idle connection
    time.sleep(0.05)
    transport.send(_event(), [])                            # no error: one retry on a fresh connection
    reqs = server.wait_for(3)
    assert len(reqs) == 3 and reqs[2].client_port != first.client_port
    assert "kept-alive connection was closed" in caplog.text
    transport.close()
    assert not transport.connected


def test_keep_alive_over_tls_reconnects_too(pki, caplog):
    caplog.set_level(logging.DEBUG, logger="appliance.uplink.http")
    with WebhookServer(tls=pki) as srv:
        transport = _transport(srv.url, tls={"ca": str(pki.ca)})
        transport.send(_event(), [])
        srv.drop_connections()
        time.sleep(0.05)
        transport.send(_event(), [])
        first, second = srv.wait_for(2)
        assert first.client_port != second.client_port
    assert "kept-alive connection was closed" in caplog.text


def test_bearer_token_from_token_file_and_configured_headers(server, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cr3t-token\n")
    transport = _transport(server.url + "?key=abc", token_file=str(token), headers={"X-Plant": "line3"})
    transport.send(_event(), [])
    token.write_text("rotated-token")                        # read per request: rotation needs no restart
    transport.send(_event(), [])
    first, second = server.wait_for(2)
    assert first.headers["Authorization"] == "Bearer s3cr3t-token"
    assert second.headers["Authorization"] == "Bearer rotated-token"
    assert first.headers["X-Plant"] == "line3"
    assert first.path == "/hook?key=abc"

    server.script(Reply(403, b"forbidden"))
    with pytest.raises(PermanentError) as err:
        transport.send(_event(), [])
    assert "key=abc" not in str(err.value)                  # the query (maybe a key) stays out of logs

    token.unlink()
    with pytest.raises(TransientError, match="cannot read token_file"):
        transport.send(_event(), [])


# ---- status handling ---------------------------------------------------------------------------


def test_5xx_is_transient_and_the_connection_stays_usable(server):
    transport = _transport(server.url)
    server.script(Reply(500, b"internal error"), Reply(503, b"maintenance", {"Retry-After": "12"}))
    with pytest.raises(TransientError) as err:
        transport.send(_event(), [])
    assert str(err.value) == f"HTTP 500 from {server.url}: internal error"
    assert err.value.retry_after_s is None and err.value.status == 500
    with pytest.raises(TransientError) as err:
        transport.send(_event(), [])
    assert err.value.retry_after_s == 12.0
    event = _event()
    transport.send(event, [])
    reqs = server.wait_for(3)
    assert reqs[2].headers["Idempotency-Key"] == event["id"]
    assert len({r.client_port for r in reqs}) == 1


@pytest.mark.parametrize("status", [408, 429])
def test_408_and_429_back_off_by_retry_after_seconds(server, status):
    server.script(Reply(status, b"slow down", {"Retry-After": "7"}))
    with pytest.raises(TransientError) as err:
        _transport(server.url).send(_event(), [])
    assert err.value.retry_after_s == 7.0
    assert f"HTTP {status} from {server.url}" in str(err.value)


def test_retry_after_as_http_date(server):
    when = email.utils.format_datetime(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30), usegmt=True)
    server.script(Reply(429, headers={"Retry-After": when}))
    with pytest.raises(TransientError) as err:
        _transport(server.url).send(_event(), [])
    assert 27 <= err.value.retry_after_s <= 30


def test_parse_retry_after():
    now = dt.datetime(2026, 11, 21, 11, 0, 0, tzinfo=dt.UTC)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after("Sat, 21 Nov 2026 11:01:30 GMT", now) == 90.0
    assert parse_retry_after("Sat, 21 Nov 2026 10:59:00 GMT", now) == 0.0   # in the past: now
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("-5", now) is None


@pytest.mark.parametrize("status, body", [
    (400, b'{"error": "invalid schema: features.score must be a number"}'),
    (404, b"no such webhook"),
    (413, b"payload too large: the limit is 1 MiB"),
])
def test_other_4xx_is_permanent_with_status_and_body_excerpt(server, status, body):
    server.script(Reply(status, body))
    with pytest.raises(PermanentError) as err:
        _transport(server.url).send(_event(), [])
    assert isinstance(err.value, HttpPermanentError) and not isinstance(err.value, TransientError)
    assert err.value.status == status
    assert str(err.value) == f"HTTP {status} from {server.url}: {body.decode()}"


def test_a_long_error_body_is_cut(server):
    server.script(Reply(400, b"invalid schema: " + b"x" * 10_000))
    with pytest.raises(PermanentError) as err:
        _transport(server.url).send(_event(), [])
    assert str(err.value).startswith(f"HTTP 400 from {server.url}: invalid schema: xxx")
    assert str(err.value).endswith("...") and len(str(err.value)) < 300


def test_redirects_are_not_followed(server):
    server.script(Reply(301, headers={"Location": "https://plant.example/hook"}))
    with pytest.raises(PermanentError, match=r"HTTP 301 .*set the URL to https://plant.example/hook"):
        _transport(server.url).send(_event(), [])


def test_a_slow_response_is_a_timeout(server):
    transport = _transport(server.url, timeout_s=0.3)
    server.script(Reply(200, delay_s=2.0))
    start = time.monotonic()
    with pytest.raises(TransientError, match="timeout after 0.3 s waiting for the response"):
        transport.send(_event(), [])
    assert time.monotonic() - start < 1.0
    transport.send(_event(), [])                              # reconnects; the next one goes through
    assert len(server.wait_for(2)) == 2


def test_a_dropped_connection_is_transient(server):
    server.script(Reply(drop=True))
    with pytest.raises(TransientError, match="connection to .* lost before a response"):
        _transport(server.url).send(_event(), [])


def test_connection_refused_when_the_server_is_gone(server):
    transport = _transport(server.url)
    transport.send(_event(), [])
    server.stop()
    with pytest.raises(TransientError, match=r"cannot connect to http://127\.0\.0\.1:\d+/hook: Connection refused"):
        transport.send(_event(), [])
    with pytest.raises(TransientError, match="Connection refused"):
        transport.connect()
    assert not transport.connected


# ---- health --------------------------------------------------------------------------------------


def test_health_goes_to_url_marked_by_header(server):
    transport = _transport(server.url)
    summary = {"queue_depth": 3, "sources": {"spindle": "up"}}
    sent = transport.publish_health(summary)
    (req,) = server.wait_for(1)
    assert sent == len(req.body)
    assert req.headers["X-Appliance-Kind"] == "health" and "Idempotency-Key" not in req.headers
    assert json.loads(req.body) == summary


def test_health_url_and_failures_never_raise(server):
    with WebhookServer(path="/health") as health:
        transport = _transport(server.url, health_url=health.url)
        assert transport.publish_health({"queue_depth": 0}) > 0
        assert health.wait_for(1)[0].path == "/health" and not server.requests
        health.script(Reply(500, b"down"))
        assert transport.publish_health({"queue_depth": 0}) == 0
        assert transport.health_failures == 1 and "HTTP 500" in transport.last_health_error
        health.stop()
        assert transport.publish_health({"queue_depth": 0}) == 0
        assert transport.health_failures == 2


# ---- TLS -----------------------------------------------------------------------------------------


def test_https_with_the_test_ca(pki):
    with WebhookServer(tls=pki) as srv:
        assert srv.url.startswith("https://")
        event = _event()
        _transport(srv.url, tls={"ca": str(pki.ca)}).send(event, [])
        assert srv.wait_for(1)[0].body == event_json(event)


@pytest.mark.parametrize("ca", ["other", "system"])
def test_https_with_an_unknown_ca_fails_clearly(pki, ca):
    tls = {"ca": str(pki.other_ca)} if ca == "other" else {}
    with WebhookServer(tls=pki) as srv:
        with pytest.raises(TransientError) as err:
            _transport(srv.url, tls=tls).send(_event(), [])
        assert str(err.value) == (f"TLS certificate verification failed for {srv.url}: unable to get local "
                                  f"issuer certificate (set tls.ca to the CA certificate that signed the "
                                  f"server's certificate)")
        assert not srv.requests


def test_https_host_mismatch_and_insecure_skip_verify(pki):
    with WebhookServer(tls=pki, cert="wronghost") as srv:
        with pytest.raises(TransientError, match=r"mismatch, certificate is not valid for '127\.0\.0\.1'"):
            _transport(srv.url, tls={"ca": str(pki.ca)}).send(_event(), [])
        _transport(srv.url, tls={"insecure_skip_verify": True}).send(_event(), [])
        assert len(srv.wait_for(1)) == 1


def test_client_certificate(pki):
    with WebhookServer(tls=pki, require_client_cert=True) as srv:
        with pytest.raises(TransientError):
            _transport(srv.url, tls={"ca": str(pki.ca)}).send(_event(), [])
        _transport(srv.url, tls={"ca": str(pki.ca), "cert": str(pki.cert("client")),
                                 "key": str(pki.key("client"))}).send(_event(), [])
        assert len(srv.wait_for(1)) == 1


# ---- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc, message", [
    ({"url": "ftp://plant/hook"}, "must start with http:// or https://"),
    ({"url": "https://user:pw@plant/hook"}, "credentials in the URL"),
    ({"url": "http://plant:99999/hook"}, "out of range"),
    ({"url": "http://plant/hook", "headers": {"Content-Type": "text/plain"}}, "set by the transport"),
    ({"url": "http://plant/hook", "headers": {"X-Bad": "a\r\nb"}}, "line breaks"),
    ({"url": "http://plant/hook", "headers": {"Bad Name": "x"}}, "not a valid header name"),
    ({"url": "http://plant/hook", "headers": {"X-Site": "Linie 3 – Presse"}}, "Latin-1"),
    ({"url": "http://plant/hook", "tls": {"insecure_skip_verify": True}}, "no URL uses https"),
    ({"url": "https://plant/hook", "tls": {"ca": "missing.pem"}}, "file not found"),
    ({"url": "https://plant/hook", "timeout_s": 0}, "greater than 0"),
    ({"url": "https://plant/hook", "verify": False}, "Extra inputs are not permitted"),
])
def test_config_errors(doc, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        HttpConfig.model_validate(doc)


def test_config_token_and_tls_files(tmp_path, pki):
    token = tmp_path / "token"
    token.write_text("t")
    with pytest.raises(pydantic.ValidationError, match="either token_file or an Authorization header"):
        HttpConfig.model_validate({"url": "http://plant/hook", "token_file": str(token),
                                   "headers": {"authorization": "Basic x"}})
    with pytest.raises(pydantic.ValidationError, match="tls.key is given without tls.cert"):
        HttpConfig.model_validate({"url": "https://plant/hook", "tls": {"key": str(pki.key("client"))}})
    with pytest.raises(pydantic.ValidationError, match="cannot load the client certificate"):
        HttpConfig.model_validate({"url": "https://plant/hook", "tls": {"cert": str(pki.cert("client")),
                                                                       "key": str(pki.key("server"))}})
    subprocess.run(["openssl", "pkey", "-in", str(pki.key("client")), "-aes256", "-passout", "pass:pw",
                    "-out", str(tmp_path / "encrypted.key")], check=True, capture_output=True)
    with pytest.raises(pydantic.ValidationError, match="the key is encrypted"):   # no password prompt
        HttpConfig.model_validate({"url": "https://plant/hook", "tls": {"cert": str(pki.cert("client")),
                                                                       "key": str(tmp_path / "encrypted.key")}})
    # Relative paths are relative to the config file, as everywhere in the appliance's config.
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_bytes(pki.ca.read_bytes())
    cfg = HttpConfig.model_validate({"url": "https://plant/hook", "token_file": "token",
                                     "tls": {"ca": "certs/ca.pem"}}, context={"base_dir": tmp_path})
    assert cfg.tls.ca == tmp_path / "certs" / "ca.pem" and cfg.token_file == token
    cfg = HttpConfig.model_validate({"url": "http://plant/hook"})
    assert cfg.timeout_s == 10 and cfg.max_attachment_bytes == 256 * 1024 and cfg.health_url is None


def test_strict_parser_rejects_sloppy_multipart():
    with pytest.raises(ValueError):
        parse_multipart(b"--b\r\nContent-Disposition: form-data; name=\"event\"\r\n\r\n{}\r\n",
                        "multipart/form-data; boundary=b")


def test_a_server_dripping_its_reply_times_out_and_close_does_not_wait(tmp_path):
    """Per-read timeouts never fire on a server sending a byte every 0.2 s: the exchange's
    deadline must, and close() from another thread must not wait behind the stuck request."""
    import socket as socketlib
    import threading
    import time as timelib

    from appliance.uplink.http import HttpConfig, HttpTransport
    from appliance.uplink.transport import TransientError

    listener = socketlib.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def drip():
        conn, _ = listener.accept()
        conn.recv(65536)
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok":
            if stop.wait(0.2):
                break
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                break
        conn.close()

    threading.Thread(target=drip, daemon=True).start()
    transport = HttpTransport(HttpConfig(url=f"http://127.0.0.1:{port}/hook", timeout_s=1.0))
    t0 = timelib.monotonic()
    from appliance.events.record import make_event
    with pytest.raises(TransientError, match="timeout after 1 s"):
        transport.send(make_event(gateway="gw", source="s", module="m", severity=1, score=1.0, message="x",
                                  window={}, features={}), [])
    assert timelib.monotonic() - t0 < 2.0
    stop.set()
    listener.close()
    transport.close()
