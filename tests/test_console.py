"""The serial console, driven as a person at a terminal would drive it: a real pty pair, the
console process on the slave side as its serial device (pyserial, 115200 8N1), keystrokes
typed one by one into the master side, and what comes back read from it. Behind the console:
the real supervisor with a simulated vibration source, vibstats built from source, and the
control socket."""
from __future__ import annotations

import json
import logging
import os
import re
import select
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
import yaml

from appliance.config.schema import AppConfig
from appliance.ops.console import Console, SerialTerminal, SettingsError, read_settings
from appliance.config.console import ConsoleSection, hash_password, verify_password
from appliance.ops.control.client import ControlClient
from appliance.ops.control.server import ControlServer
from appliance.core.supervisor import Supervisor
from hal.drivers.serial.console_port import open_console_port

from conftest import REPO
from serialpeers import Pty
from support import metric, sim_source, wait_for, write_config

PASSWORD = "s3cret!"


class Keyboard:
    """The person at the terminal: types into the pty master, reads what the console sends."""

    def __init__(self, pty: Pty) -> None:
        self.pty = pty
        self.out = bytearray()
        self.pos = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True, name="keyboard")
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.pty.master], [], [], 0.05)
            if ready:
                try:
                    data = os.read(self.pty.master, 4096)
                except OSError:
                    return
                with self._lock:
                    self.out += data

    def type(self, keys: str | bytes, gap_s: float = 0.004) -> None:
        for b in keys.encode() if isinstance(keys, str) else keys:
            os.write(self.pty.master, bytes([b]))
            time.sleep(gap_s)

    def expect(self, text: str, timeout_s: float = 10.0) -> str:
        """Wait for `text` after what was already consumed; return everything up to its end."""
        needle = text.encode()
        end = time.monotonic() + timeout_s
        while True:
            with self._lock:
                at = self.out.find(needle, self.pos)
                if at >= 0:
                    seen = bytes(self.out[self.pos:at + len(needle)])
                    self.pos = at + len(needle)
                    return seen.decode("ascii")
                tail = bytes(self.out[self.pos:])
            if time.monotonic() > end:
                raise AssertionError(f"no {text!r} from the console within {timeout_s} s; it sent: {tail!r}")
            time.sleep(0.01)

    def command(self, line: str, prompt: str = "test-gw> ") -> str:
        """Type a command and Enter; the reply up to the next prompt (echo included)."""
        self.type(line + "\r")
        return self.expect(prompt)

    def everything(self) -> bytes:
        with self._lock:
            return bytes(self.out)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


@pytest.fixture
def appliance(tmp_path, vibstats_wasm):
    """A running supervisor with the control socket, and its YAML with a console password."""
    cfg = write_config(tmp_path, {"vib": sim_source(block_s=0.02, fault={"type": "outer_race", "start_s": 0.5})},
                       {"stats": {"wasm": str(vibstats_wasm), "source": "vib", "window": {"size": 512},
                                  "params": {"baseline": {"windows": 4}}}})
    path = tmp_path / "appliance.yaml"
    # The console reads its own section of the same file (the supervisor was built from it already).
    with path.open("a") as f:
        f.write(f"console:\n  baudrate: 115200\n  password_hash: '{hash_password(PASSWORD)}'\n")
    level = logging.getLogger("appliance").level
    logging.getLogger("appliance").setLevel(logging.INFO)   # what `appliance run` logs, for `log tail`
    sup = Supervisor(cfg)
    sup.config_path = path
    sup.start()
    # The supervisor serves the socket itself once that is wired (sup.control); until then, here.
    server = getattr(sup, "control", None)
    own = server is None
    if own:
        server = ControlServer(sup, cfg.gateway.data_dir / "control.sock", config_path=path).start()
    try:
        yield sup, server, path
    finally:
        if own:
            server.stop()
        sup.stop()
        logging.getLogger("appliance").setLevel(level)


@pytest.fixture
def console_on_pty(appliance, tmp_path):
    """`appliance console --device /dev/pts/N` in its own process, as on the gateway."""
    sup, _, path = appliance
    pty = Pty()
    keyboard = Keyboard(pty)
    log_file = (tmp_path / "console.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "appliance.ops.console", "--config", str(path), "--device", pty.path],
                            cwd=REPO, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        yield sup, keyboard
    finally:
        proc.terminate()
        try:
            assert proc.wait(5) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            keyboard.close()
            pty.close()
            log_file.close()
            print((tmp_path / "console.log").read_text())


def test_console_session_on_a_serial_line(console_on_pty):
    sup, kb = console_on_pty
    host = sup.modules["stats"]
    wait_for(lambda: host.processed > 0 and sup.spool.depth() > 0, 60, "windows processed and an event")

    # The banner names the gateway and version; without a login only status, sensors, version.
    kb.expect("appliance 0.1.0 console - gateway test-gw")
    kb.expect("Without a login: status, sensors, version. Type 'login' for the rest.")
    kb.expect("test-gw (guest)> ")
    assert "gateway  test-gw, appliance 0.1.0" in kb.command("status", prompt="test-gw (guest)> ")
    for refused in ("modules load stats x.wasm", "config reload", "modules restart stats", "config show"):
        assert f"'{refused.split()[0]}' needs a login (type 'login')" in kb.command(refused, prompt="test-gw (guest)> ")
    assert metric(sup, "appliance_module_restarts_total", module="stats") == 0
    # A password is asked for, and not echoed.
    kb.type("login\r")
    kb.expect("Password: ")
    kb.type("hunter2\r")
    assert "hunter2" not in kb.expect("Login incorrect.")
    kb.expect("Password: ")
    kb.type(PASSWORD + "\r")
    assert PASSWORD not in kb.expect("Welcome to test-gw")
    kb.expect("test-gw> ")

    reply = kb.command("help")
    assert "modules restart NAME" in reply and "events show ID" in reply and "log tail [N]" in reply
    assert "logout" in reply

    # Backspace editing, both codes a terminal may send: "statsu" BS BS "us" is "status".
    kb.type("statsu")
    kb.type(b"\x7f\x08")
    reply = kb.command("us")
    assert "statsu\b \b\b \bus" in reply
    assert "gateway  test-gw, appliance 0.1.0" in reply
    assert re.search(r"source   vib +ok", reply) and re.search(r"module   stats +running", reply)

    reply = kb.command("frobnicate")
    assert "unknown command 'frobnicate'" in reply and "commands: help status sensors modules" in reply

    # Ctrl-U clears the line, Ctrl-C cancels it: neither runs anything.
    restarts = metric(sup, "appliance_module_restarts_total", module="stats")
    kb.type("modules restart stats\x03")
    kb.expect("^C\r\ntest-gw> ")
    kb.type("modules restart stats\x15")
    reply = kb.command("version")
    assert "appliance 0.1.0 (gateway test-gw" in reply and "restarting" not in reply
    assert metric(sup, "appliance_module_restarts_total", module="stats") == restarts

    # A restart from the console shows in the metrics, and in the console's own view of them.
    reply = kb.command("modules restart stats")
    assert "module stats: restarting" in reply
    wait_for(lambda: metric(sup, "appliance_module_restarts_total", module="stats") == restarts + 1
             and host.state.value == "running", 10, "the restarted module running again")
    reply = kb.command("modules stats stats")
    assert f"restarts   {restarts + 1:.0f}; quarantined no" in reply
    assert re.search(r"module +stats: running \(worker pid \d+\)", reply)

    # Disable and enable: the worker goes away and comes back.
    assert "module stats: disabled" in kb.command("modules disable stats")
    wait_for(lambda: metric(sup, "appliance_module_up", module="stats") == 0, 5, "the worker stopped")
    assert re.search(r"stats +disabled +vib", kb.command("modules"))
    assert "module stats: enabled" in kb.command("modules enable stats")
    wait_for(lambda: host.state.value == "running", 10, "the module running again")

    reply = kb.command("events tail 5")
    event = sup.spool.tail(1)[0]
    assert f"vib/stats: {event['message']} [{event['id']}]" in reply
    reply = kb.command(f"events show {event['id'][-12:]}")
    assert f'"id": "{event["id"]}"' in reply and '"severity": "' in reply

    reply = kb.command("log tail 5")
    assert re.search(r"\d\d:\d\d:\d\d (INFO|WARNING) +appliance\.\w+: ", reply)
    assert "control: modules enable stats" in kb.command("log tail 50")

    reply = kb.command("sensors")
    assert re.search(r"vib +sim_vibration +ok .* Hz +12.8k Hz +0 +3 ch", reply)
    assert f"restarts {metric(sup, 'appliance_module_restarts_total', module='stats'):.0f}  p99 <= " \
        in kb.command("metrics summary")
    reply = kb.command("config validate")
    if "console" in AppConfig.model_fields:
        assert "appliance.yaml: ok (1 sources, 1 modules)" in reply
    else:   # until the lead adds `console:` to AppConfig, the full validation names it, with its line
        assert re.search(r"appliance.yaml:\d+:1: console: 'console' is not a valid option", reply)
    assert "gateway: {name: test-gw" in kb.command("config show")

    kb.type("logout\r")
    kb.expect("bye")
    kb.expect("test-gw (guest)> ")

    # Plain ASCII only: no escape sequences, nothing above 0x7e but what the editor sends.
    out = kb.everything()
    assert b"\x1b" not in out
    assert all(b in (0x07, 0x08, 0x0A, 0x0D) or 0x20 <= b <= 0x7E for b in out)
    # The transcript (pytest -s shows it; docs/console.md has one): erasures shown as <BS>.
    print(out.decode("ascii").replace("\b \b", "<BS>").replace("\r\n", "\n"))


def test_wrong_passwords_cost_a_delay_and_no_appliance_is_explained(tmp_path):
    """Three wrong tries: a delay during which typing is dropped. Without a supervisor the
    console still answers (help from its own copy; other commands say it is not running)."""
    pty = Pty()
    kb = Keyboard(pty)
    port = open_console_port(pty.path, 115200, timeout=0.05)
    stop = threading.Event()
    client = ControlClient(tmp_path / "control.sock")
    console = Console(SerialTerminal(port), client, gateway="gw-7", password_hash=hash_password("pw", "pbkdf2_sha256",
                      iterations=1000), fail_delay_s=0.5)
    thread = threading.Thread(target=console.run, args=(stop,), daemon=True)
    thread.start()
    try:
        kb.expect("gateway gw-7")
        kb.type("login\r")
        for attempt in ("a", "b", "c"):
            kb.expect("Password: ")
            kb.type(attempt + "\r")
        kb.expect("3 wrong passwords: wait 0.5 s.")
        kb.type("pw\r")                  # typed during the delay: dropped
        kb.expect("Password: ")
        time.sleep(0.2)
        assert console.authenticated is False
        kb.type("pw\r")
        kb.expect("Welcome to gw-7")
        kb.expect("gw-7> ")
        reply = kb.command("status", prompt="gw-7> ")
        assert "the appliance is not running (control socket" in reply
        reply = kb.command("help", prompt="gw-7> ")
        assert "modules restart NAME" in reply and "not running" in reply
        kb.type("modules\x1b[A\x1b[D list\r")   # arrow keys are ignored, not inserted
        assert "modules list" in kb.expect("gw-7> ")
    finally:
        stop.set()
        thread.join(2)
        port.close()
        kb.close()
        pty.close()


def test_console_on_stdio(appliance):
    """--stdio with a pipe: no echo; the password is the first line."""
    sup, _, path = appliance
    wait_for(lambda: sup.modules["stats"].state.value == "running", 60, "the module running")
    proc = subprocess.run([sys.executable, "-m", "appliance.ops.console", "--config", str(path), "--stdio"],
                          input=f"login\n{PASSWORD}\nversion\nmodules list\nexit\n", capture_output=True, text=True,
                          cwd=REPO, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "Password: Welcome to test-gw" in proc.stdout
    assert "appliance 0.1.0 (gateway test-gw" in proc.stdout
    assert re.search(r"stats +running +vib", proc.stdout)
    assert "version" not in proc.stdout.split("Welcome", 1)[1].split("appliance 0.1.0 (")[0]   # no echo


def test_control_socket_protocol(appliance):
    sup, server, _ = appliance
    mode = os.stat(server.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(server.path))
        reader = s.makefile("rb")

        def ask(line: str) -> list[bytes]:
            s.sendall(line.encode() + b"\n")
            lines = []
            while (raw := reader.readline()) != b"\n":
                assert raw, "connection closed mid-reply"
                lines.append(raw.rstrip(b"\n"))
            return lines

        reply = ask("json status")
        assert reply[0] == b"OK" and len(reply) == 2
        status = json.loads(reply[1])
        assert status["gateway"] == "test-gw" and "stats" in status["modules"]
        reply = ask("nonsense")
        assert reply[0] == b"ERR" and b"unknown command 'nonsense'" in reply[1]
        reply = ask("config show")
        assert reply[0] == b"OK" and all(reply)        # no empty body line: only the end of a reply
        # modules load takes files from the modules' own folder, and nowhere else (links followed).
        outside = sup.cfg.modules["stats"].wasm.parent.parent / "elsewhere"
        outside.mkdir(exist_ok=True)
        shutil.copy(sup.cfg.modules["stats"].wasm, outside / "stats.wasm")
        link = sup.cfg.modules["stats"].wasm.parent / "link-out.wasm"
        link.unlink(missing_ok=True)
        link.symlink_to(outside / "stats.wasm")
        for path in (outside / "stats.wasm", "../elsewhere/stats.wasm", link.name):
            reply = ask(f"modules load stats {path}")
            assert reply[0] == b"ERR" and b"modules load takes modules from" in reply[1], reply
        link.unlink()
        reply = ask(f"modules load stats {sup.cfg.modules['stats'].wasm.name}")
        assert reply == [b"OK", f"module stats: loaded {sup.cfg.modules['stats'].wasm}".encode()], reply
        assert ask("events tail 0") == [b"ERR", b"'0' is not a count from 1 to 1000"]

    # A second server on the same path refuses while the first is alive.
    with pytest.raises(OSError, match="another appliance"):
        ControlServer(sup, server.path).start()


def test_password_hashes_and_the_console_section(tmp_path):
    encoded = subprocess.run([sys.executable, "-m", "appliance.ops.console", "hash-password"], input="open sesame\n",
                             capture_output=True, text=True, cwd=REPO, timeout=30).stdout.strip()
    assert encoded.startswith("scrypt$") and verify_password("open sesame", encoded)
    assert not verify_password("open sesame!", encoded)
    pbkdf2 = hash_password("x", "pbkdf2_sha256", iterations=1000)
    assert re.fullmatch(r"pbkdf2_sha256\$1000\$[\w-]+\$[A-Za-z0-9+/=]+", pbkdf2) and verify_password("x", pbkdf2)
    assert ConsoleSection().baudrate == 115200 and ConsoleSection().device is None
    with pytest.raises(ValueError, match="not a usable password hash"):
        ConsoleSection(password_hash="md5$abc")

    cfg = tmp_path / "a.yaml"
    cfg.write_text("gateway:\n  name: gw\nconsole:\n  device: /dev/ttyGS0\n  password_hash: 'scrypt$x$3$8$1$AAAA'\n")
    with pytest.raises(SettingsError, match=r"a.yaml:5:\d+: console.password_hash: not a usable password hash"):
        read_settings(cfg)
    cfg.write_text("gateway:\n  name: gw\n  data_dir: var\nconsole:\n  device: /dev/ttyGS0\n")
    settings = read_settings(cfg)
    assert settings.console.device == "/dev/ttyGS0" and settings.data_dir == tmp_path / "var"


def test_console_without_a_device_exits_3_so_the_service_does_not_loop(tmp_path):
    from support import sim_source
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"gateway": {"name": "gw", "data_dir": str(tmp_path / "var")},
                                   "sources": {"s": sim_source()}}))
    proc = subprocess.run([sys.executable, "-m", "appliance", "console", "--config", str(cfg)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "no console device" in proc.stderr


def test_system_command_reports_this_machine(appliance):
    sup, server, _ = appliance
    client = ControlClient(server.path, hello="test")
    try:
        reply = client.request("json system")
    finally:
        client.close()
    assert reply.ok, reply.lines
    data = json.loads(reply.lines[0])
    assert data["hostname"] == socket.gethostname()
    assert data["memory"]["total"] > data["memory"]["available"] > 0
    assert data["disks"]["data"]["path"] == str(sup.cfg.gateway.data_dir)
    assert 0 < data["disks"]["data"]["free"] <= data["disks"]["data"]["total"]
    assert data["uptime_s"] > 0


class ScriptTerminal:
    """A terminal for Console unit tests: what is typed comes from a list, what is sent is kept."""
    echo = False

    def __init__(self, typed: list[bytes]) -> None:
        self.typed = list(typed)
        self.sent = bytearray()

    def read(self) -> bytes:
        if not self.typed:
            raise EOFError
        time.sleep(0.01)
        return self.typed.pop(0)

    def write(self, data: bytes) -> None:
        self.sent += data


class Unreachable:
    """No supervisor behind the console: these tests only need the console's own rules."""

    def request(self, line: str):
        from appliance.ops.control.protocol import ControlError
        raise ControlError(f"sent {line!r}")


def session(typed: list[str], **kw) -> str:
    term = ScriptTerminal([t.encode() + b"\r" for t in typed])
    Console(term, Unreachable(), gateway="gw", exit_on_logout=True, **kw).run(threading.Event())
    return term.sent.decode()


def test_wrong_password_delay_survives_reopening_the_port(tmp_path):
    from appliance.ops.console import LoginThrottle
    encoded = hash_password("pw", "pbkdf2_sha256", iterations=1000)
    state = tmp_path / "console-login.json"
    out = session(["login", "a", "b", "c"], password_hash=encoded, throttle=LoginThrottle(state, fail_delay_s=30))
    assert "3 wrong passwords: wait 30 s." in out
    # The port is reopened (or the service restarted): a new session, the same delay still running.
    typed = ["login", "pw"]
    term = ScriptTerminal([t.encode() + b"\r" for t in typed])
    console = Console(term, Unreachable(), gateway="gw", password_hash=encoded, exit_on_logout=True,
                      throttle=LoginThrottle(state, fail_delay_s=30))
    thread = threading.Thread(target=console.run, args=(threading.Event(),), daemon=True)
    thread.start()
    thread.join(3)
    assert "3 wrong passwords: wait" in term.sent.decode() and not console.authenticated
    assert json.loads(state.read_text())["failures"] == 3


def test_without_a_password_only_status_sensors_version_answer():
    out = session(["modules load m /data/x.wasm", "config reload", "status", "login", "exit"])
    assert "'modules' needs a login: no console password is set in appliance.yaml" in out
    assert "'config' needs a login" in out
    assert "sent 'status'" in out                      # passed on to the supervisor
    assert "no console password is set: put console.password_hash" in out
    assert "sent 'modules" not in out and "sent 'config" not in out
    # `console.password: none`, said explicitly, opens every command without a login.
    assert "sent 'config reload'" in session(["config reload", "exit"], open_access=True)


def test_console_password_none_is_explicit(tmp_path):
    assert ConsoleSection(password="none").password == "none"
    with pytest.raises(ValueError, match="contradict each other"):
        ConsoleSection(password="none", password_hash=hash_password("x", "pbkdf2_sha256", iterations=1000))
    cfg = tmp_path / "a.yaml"
    cfg.write_text("gateway:\n  name: gw\nconsole:\n  password: no\n")
    with pytest.raises(SettingsError, match=r"a.yaml:4:\d+: console.password"):
        read_settings(cfg)


def test_config_show_hides_url_credentials_and_query_strings():
    from appliance.ops.control.text import redact
    shown = redact({"uplink": {"http": {"url": "https://ops:hunter2@hooks.example.com:8443/in?key=abc123#frag",
                                        "headers": {"Authorization": "Bearer x"}},
                               "mqtt": {"host": "broker", "password": "pw"}},
                    "note": "plain text", "plain": "https://example.com/path"})
    text = json.dumps(shown)
    assert "hunter2" not in text and "abc123" not in text and "ops" not in text and "Bearer" not in text
    assert shown["uplink"]["http"]["url"] == "https://<hidden>@hooks.example.com:8443/in?<hidden>#<hidden>"
    assert shown["plain"] == "https://example.com/path" and shown["note"] == "plain text"



def test_two_console_ports_share_one_count_of_wrong_passwords(tmp_path):
    """The UART and the USB gadget port each run a console: two wrong tries on one and one on
    the other are three, and the third earns the delay."""
    from appliance.ops.console import LoginThrottle
    uart = LoginThrottle(tmp_path / "console-login.json", fail_delay_s=30)
    gadget = LoginThrottle(tmp_path / "console-login.json", fail_delay_s=30)
    assert uart.failed() == 0 and uart.failed() == 0
    assert gadget.failed() == 30 and uart.remaining() > 25
