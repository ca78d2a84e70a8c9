"""`appliance console`: a line-oriented shell on a serial line (or stdin/stdout) that attaches
to the running supervisor through its control socket (appliance/ops/control/; docs/console.md).

For a laptop with a USB-serial cable and picocom or screen at 115200 8N1: plain ASCII out, no
ANSI sequences; the console echoes what is typed and edits the line itself (Backspace as 0x08
or 0x7f, Ctrl-U clears the line, Ctrl-W erases a word, Ctrl-C cancels it, CR or LF ends it,
arrow keys are ignored). Without a login only status, sensors and version answer; `login` asks
for the password (`console.password_hash` in the YAML), and the YAML's `console.password: none`
opens everything without one. Three wrong tries in a row cost a delay that doubles with every
further three, up to a minute, kept in <data_dir>/console-login.json across reopened ports and
restarts.

The console holds no appliance state: every command goes to the supervisor, so the console
can run before the supervisor (it says so), across its restarts, and as its own service on
/dev/ttyAMA0, /dev/ttyS0 or the USB gadget port /dev/ttyGS0.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import sys
import termios
import threading
import time
import tty
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from appliance import __version__
from appliance.config.console import ConsoleSection, PasswordHashError, hash_password, verify_password
from appliance.ops.control.client import ControlClient
from appliance.ops.control.commands import help_lines
from appliance.ops.control.protocol import ControlError, socket_path

log = logging.getLogger("appliance.console")

MAX_LINE = 512
FAIL_TRIES = 3              # wrong passwords in a row before a delay
FAIL_DELAY_S = 5.0          # the first delay; doubles with every further FAIL_TRIES, up to FAIL_DELAY_MAX_S
FAIL_DELAY_MAX_S = 60.0
IDLE_LOGOUT_S = 900.0       # with a password: log out after this long without input
READ_TIMEOUT_S = 0.2
REOPEN_S = 2.0

CONSOLE_HELP = ["console: login, logout (or exit, quit); Backspace erases, Ctrl-U clears the line, "
                "Ctrl-C cancels it"]

# Characters the appliance's texts use that a plain ASCII terminal cannot show.
_ASCII = str.maketrans({"µ": "u", "×": "x", "°": "deg", "–": "-", "—": "-", "…": "...", "≤": "<=", "≥": ">=",
                        "’": "'", "‘": "'", "“": '"', "”": '"', "→": "->", "←": "<-", "±": "+/-", "\t": "    "})


def to_ascii(text: str) -> str:
    """Printable ASCII only: no escape sequences or other control characters reach the terminal."""
    text = text.translate(_ASCII)
    return "".join(c if " " <= c <= "~" else "?" for c in text)


# ------------------------------------------------------------------------------ terminals

class Terminal(Protocol):
    echo: bool   # whether the console echoes what is typed (a pipe on stdin: no)

    def read(self) -> bytes: ...        # what arrived within READ_TIMEOUT_S, maybe b""; EOFError when gone
    def write(self, data: bytes) -> None: ...


class SerialTerminal:
    """A port from hal.drivers.serial.console_port (opened with READ_TIMEOUT_S). A failing port raises
    pyserial's SerialException, an OSError."""

    echo = True

    def __init__(self, port) -> None:
        self.port = port

    def read(self) -> bytes:
        waiting = self.port.in_waiting
        return self.port.read(waiting or 1)

    def write(self, data: bytes) -> None:
        self.port.write(data)


class StdioTerminal:
    """stdin/stdout. A terminal is put in raw mode (restored by close()); a pipe is read as is,
    without echo."""

    def __init__(self, fd_in: int = 0, fd_out: int = 1) -> None:
        self.fd_in, self.fd_out = fd_in, fd_out
        self._saved = None
        self.echo = os.isatty(fd_in)
        if self.echo:
            self._saved = termios.tcgetattr(fd_in)
            tty.setraw(fd_in)

    def read(self) -> bytes:
        ready, _, _ = select.select([self.fd_in], [], [], READ_TIMEOUT_S)
        if not ready:
            return b""
        data = os.read(self.fd_in, 1024)
        if not data:
            raise EOFError
        return data

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd_out, view):]

    def close(self) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.fd_in, termios.TCSADRAIN, self._saved)
            self._saved = None


# ---------------------------------------------------------------------------- line editor

CANCEL = object()    # Ctrl-C
EOF = object()       # Ctrl-D on an empty line


class LineEditor:
    """Bytes in, one line out; echoes as it goes (nothing at all while `hidden`)."""

    def __init__(self, write: Callable[[bytes], None], echo: bool = True) -> None:
        self._write = write
        self.echo = echo
        self.hidden = False
        self.buf: list[str] = []
        self._esc = 0            # 0: normal; 1: after ESC; 2: in a CSI/SS3 sequence
        self._after_cr = False

    def reset(self, hidden: bool = False) -> None:
        self.buf.clear()
        self.hidden = hidden
        self._esc = 0

    def _out(self, data: bytes) -> None:
        if self.echo and not self.hidden:
            self._write(data)

    def _erase(self, n: int) -> None:
        if n:
            self._out(b"\b \b" * n)
            del self.buf[-n:]

    def feed(self, byte: int):
        """A str when a line is complete, CANCEL, EOF, or None."""
        after_cr, self._after_cr = self._after_cr, False
        if self._esc == 1:                  # ESC x: a two-byte sequence, or the start of CSI/SS3
            self._esc = 2 if byte in (0x5B, 0x4F) else 0
            return None
        if self._esc == 2:                  # parameters until the final byte (arrow keys, F-keys)
            if 0x40 <= byte <= 0x7E:
                self._esc = 0
            return None
        if byte == 0x1B:
            self._esc = 1
        elif byte in (0x0D, 0x0A):
            if byte == 0x0A and after_cr:   # CR LF: one line end
                return None
            self._after_cr = byte == 0x0D
            line = "".join(self.buf)
            self.buf.clear()
            if self.echo:
                self._write(b"\r\n")
            return line
        elif byte in (0x08, 0x7F):
            self._erase(1 if self.buf else 0)
        elif byte == 0x15:                  # Ctrl-U
            self._erase(len(self.buf))
        elif byte == 0x17:                  # Ctrl-W: back over spaces, then the word
            n = len(self.buf)
            while n and self.buf[n - 1] == " ":
                n -= 1
            while n and self.buf[n - 1] != " ":
                n -= 1
            self._erase(len(self.buf) - n)
        elif byte == 0x03:                  # Ctrl-C
            self.buf.clear()
            if self.echo:
                self._write(b"^C\r\n")
            return CANCEL
        elif byte == 0x04:                  # Ctrl-D
            if not self.buf:
                if self.echo:
                    self._write(b"\r\n")
                return EOF
        elif 0x20 <= byte <= 0x7E:
            if len(self.buf) >= MAX_LINE:
                self._out(b"\x07")
            else:
                self.buf.append(chr(byte))
                self._out(bytes([byte]))
        # Anything else (tab, other control characters, non-ASCII bytes) is ignored.
        return None


# -------------------------------------------------------------------------------- console

class LoginThrottle:
    """Wrong passwords in a row and the delay they earned, kept in a file so that neither
    reopening the port nor restarting the console service clears them. The delay is counted on
    the boot clock (CLOCK_BOOTTIME), which a wall-clock change does not move."""

    def __init__(self, path: Path | None = None, fail_delay_s: float = FAIL_DELAY_S) -> None:
        self.path = path
        self.fail_delay_s = fail_delay_s
        self.failures = 0
        self._until = 0.0
        self._load()

    def _load(self) -> None:
        """What the file says, when it says more: every console (the UART, the USB gadget port)
        shares one count, so two ports do not give twice the tries."""
        if self.path is None:
            return
        try:
            state = json.loads(self.path.read_text())
            failures, until = int(state["failures"]), float(state["until"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if until > self._now() + FAIL_DELAY_MAX_S:   # from an earlier boot: at most the longest delay
            until = self._now() + FAIL_DELAY_MAX_S
        self.failures, self._until = max(self.failures, failures), max(self._until, until)

    @staticmethod
    def _now() -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def remaining(self) -> float:
        self._load()
        return max(0.0, self._until - self._now())

    def failed(self) -> float:
        """Count a wrong password; the delay it starts (0 for none)."""
        self._load()
        self.failures += 1
        delay = 0.0
        if self.failures % FAIL_TRIES == 0:
            delay = min(self.fail_delay_s * 2 ** (self.failures // FAIL_TRIES - 1), FAIL_DELAY_MAX_S)
            self._until = self._now() + delay
        self._save()
        return delay

    def succeeded(self) -> None:
        self.failures, self._until = 0, 0.0
        self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"failures": self.failures, "until": self._until}))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("console: cannot keep the login delay in %s: %s", self.path, exc)


# What answers without a login (docs/console.md): enough to see the machine, nothing to change it.
GUEST_COMMANDS = ("status", "sensors", "version")
SESSION_COMMANDS = ("help", "login", "logout", "exit", "quit")


class Console:
    """One session loop on one terminal. run() returns when `stop` is set, or on logout/EOF
    when exit_on_logout (stdio); a serial console instead shows the banner again.

    Access: with a password hash, a session starts as a guest (only GUEST_COMMANDS) until
    `login`; with open_access (the YAML's `console.password: none`) everything answers at once;
    with neither, the console stays a guest's: there is no password to log in with."""

    def __init__(self, term: Terminal, client: ControlClient, *, gateway: str, password_hash: str | None = None,
                 open_access: bool = False, exit_on_logout: bool = False, fail_delay_s: float = FAIL_DELAY_S,
                 idle_logout_s: float = IDLE_LOGOUT_S, throttle: LoginThrottle | None = None) -> None:
        self.term = term
        self.client = client
        self.gateway = gateway
        self.password_hash = password_hash
        self.exit_on_logout = exit_on_logout
        self.idle_logout_s = idle_logout_s
        self.throttle = throttle or LoginThrottle(fail_delay_s=fail_delay_s)
        self.editor = LineEditor(term.write, echo=term.echo)
        self.authenticated = open_access and password_hash is None
        self.asking_password = False
        self._last_input = time.monotonic()
        self._done = False

    # ---- output

    def say(self, *lines: str) -> None:
        if lines:
            self.term.write(("\r\n".join(to_ascii(line) for line in lines) + "\r\n").encode("ascii"))

    def prompt(self) -> None:
        if self.asking_password:
            self.editor.reset(hidden=True)
            self.term.write(b"Password: ")
            return
        self.editor.reset()
        self.term.write(to_ascii(f"{self.gateway}{'' if self.authenticated else ' (guest)'}> ").encode("ascii"))

    def banner(self) -> None:
        if self.authenticated:
            hint = "Type 'help' for commands."
        elif self.password_hash:
            hint = f"Without a login: {', '.join(GUEST_COMMANDS)}. Type 'login' for the rest."
        else:
            hint = (f"Without a login: {', '.join(GUEST_COMMANDS)}. No console password is set: put "
                    "console.password_hash (appliance console hash-password) in appliance.yaml to log in.")
        self.say("", f"appliance {__version__} console - gateway {self.gateway}", hint)

    # ---- loop

    def run(self, stop: threading.Event) -> None:
        self.banner()
        self.prompt()
        while not stop.is_set() and not self._done:
            try:
                data = self.term.read()
            except EOFError:
                return
            now = time.monotonic()
            if not data:
                if self.password_hash and self.authenticated and now - self._last_input > self.idle_logout_s:
                    self.say("", f"no input for {self.idle_logout_s / 60:.0f} min: logged out")
                    self.logout()
                continue
            self._last_input = now
            for byte in data:
                if self._done or self._feed(byte) == "flush":
                    break   # what was typed during a login delay is dropped

    def _feed(self, byte: int):
        result = self.editor.feed(byte)
        if result is None:
            return None
        if result is EOF:
            self.logout()
            return None
        if result is CANCEL:
            self.asking_password = False
            self.prompt()
            return None
        if self.asking_password:
            return self._login(result)
        self.handle(result)
        if not self._done:
            self.prompt()
        return None

    def _wait_out(self, delay: float) -> str | None:
        """Drop whatever is typed until the delay is over."""
        self.say(f"{self.throttle.failures} wrong passwords: wait {delay:.0f} s." if delay >= 1 else
                 f"{self.throttle.failures} wrong passwords: wait {delay:g} s.")
        end = time.monotonic() + delay
        while time.monotonic() < end:
            try:
                self.term.read()
            except EOFError:
                self._done = True
                return "flush"
        return None

    def _login(self, password: str):
        if not password:   # an empty line: back to the guest prompt
            self.asking_password = False
            self.prompt()
            return None
        if verify_password(password, self.password_hash):
            self.authenticated = True
            self.asking_password = False
            self.throttle.succeeded()
            log.info("console: logged in")
            self.say(f"Welcome to {self.gateway}. Type 'help' for commands.")
            self.prompt()
            return None
        delay = self.throttle.failed()
        log.warning("console: wrong password (%d in a row)", self.throttle.failures)
        self.say("Login incorrect.")
        if delay:
            if self._wait_out(delay) == "flush":
                return "flush"
            self.prompt()
            return "flush"
        self.prompt()
        return None

    def _start_login(self) -> str | None:
        if self.authenticated:
            self.say("already logged in")
            return None
        if not self.password_hash:
            self.say("no console password is set: put console.password_hash (appliance console hash-password) "
                     "in appliance.yaml, or console.password: none")
            return None
        left = self.throttle.remaining()
        if left > 0 and self._wait_out(left) == "flush":
            return "flush"
        self.asking_password = True
        return None

    def logout(self) -> None:
        if self.exit_on_logout:
            self._done = True
            return
        self._drop_login()
        self.banner()
        self.prompt()

    def _drop_login(self) -> None:
        self.asking_password = False
        if self.password_hash and self.authenticated:
            self.authenticated = False
            log.info("console: logged out")

    # ---- commands

    def handle(self, line: str) -> None:
        words = line.split()
        if not words:
            return
        if words[0] in ("logout", "exit", "quit") and len(words) == 1:
            self.say("bye")
            if self.exit_on_logout:
                self._done = True
            else:
                self.logout_quietly()
            return
        if words == ["login"]:
            self._start_login()
            return
        if not self.authenticated:
            if words[0] == "help":
                self.say(f"without a login: {', '.join(GUEST_COMMANDS)}; login; logout")
                return
            if words[0] not in GUEST_COMMANDS:
                self.say(f"'{words[0]}' needs a login" + (" (type 'login')" if self.password_hash else
                                                          ": no console password is set in appliance.yaml"))
                return
        try:
            reply = self.client.request(line.strip())
        except ControlError as exc:
            if words[0] == "help":
                self.say("commands:", *help_lines(), *CONSOLE_HELP, f"({exc})")
            else:
                self.say(str(exc))
            return
        lines = list(reply.lines)
        if words == ["help"] and reply.ok:
            lines += CONSOLE_HELP
        self.say(*lines)

    def logout_quietly(self) -> None:
        """`logout` typed: back to the banner (a guest again, if there is a password)."""
        self._drop_login()
        self.banner()


# ------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class ConsoleSettings:
    gateway: str
    data_dir: Path
    console: ConsoleSection


class SettingsError(Exception):
    pass


def read_settings(path: Path | str) -> ConsoleSettings:
    """What the console needs from the YAML: gateway.name, gateway.data_dir and console:.
    Read on its own (not through the whole AppConfig), so the console still starts when a
    source's section would not validate; errors say file:line."""
    from pydantic import ValidationError

    from appliance.config.schema import GatewaySection
    from appliance.config.yamlsource import YamlError, load_yaml
    try:
        doc = load_yaml(path)
    except (YamlError, OSError) as exc:
        raise SettingsError(str(exc)) from None
    data = doc.data if isinstance(doc.data, dict) else {}
    context = {"base_dir": doc.path.resolve().parent}
    problems = []
    sections = {}
    for key, model in (("gateway", GatewaySection), ("console", ConsoleSection)):
        try:
            sections[key] = model.model_validate(data.get(key) or {}, context=context)
        except ValidationError as exc:
            for err in exc.errors():
                where = (key, *err["loc"])
                mark = doc.mark_for(where, key=err["type"] == "extra_forbidden")
                message = err["msg"].removeprefix("Value error, ")
                problems.append(f"{doc.path}:{mark.line}:{mark.column}: {'.'.join(map(str, where))}: {message}")
    if problems:
        raise SettingsError("\n".join(problems))
    return ConsoleSettings(sections["gateway"].name, sections["gateway"].data_dir, sections["console"])


# ----------------------------------------------------------------------------------- main

def _hash_password_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="appliance console hash-password",
                                description="Make a console.password_hash for the YAML. Reads the password "
                                            "from the terminal (twice), or one line from a pipe.")
    p.add_argument("--algorithm", choices=["scrypt", "pbkdf2_sha256"], default="scrypt")
    p.add_argument("--iterations", type=int, default=600_000, help="pbkdf2_sha256 only (default: %(default)s)")
    args = p.parse_args(argv)
    if sys.stdin.isatty():
        import getpass
        password = getpass.getpass("Console password: ")
        if password != getpass.getpass("Again: "):
            print("the two passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("an empty password is no password: leave console.password_hash out instead", file=sys.stderr)
        return 1
    if any(not " " <= c <= "~" for c in password):
        print("use printable ASCII only: a serial terminal may not send anything else", file=sys.stderr)
        return 1
    try:
        encoded = hash_password(password, args.algorithm, iterations=args.iterations)
    except (PasswordHashError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    print(encoded)
    print(f"in the YAML:\n  console:\n    password_hash: '{encoded}'", file=sys.stderr)
    return 0


def console_main(argv: list[str] | None = None) -> int:
    """appliance console [--config FILE] [--device DEV | --stdio] [--socket PATH] [--baudrate N]
    appliance console hash-password [--algorithm scrypt|pbkdf2_sha256]"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["hash-password"]:
        return _hash_password_main(argv[1:])
    from appliance.config.schema import DEFAULT_CONFIG
    p = argparse.ArgumentParser(
        prog="appliance console",
        description="A shell on a serial line (console.device from the YAML, or --device) or on this terminal "
                    "(--stdio), attached to the running appliance through its control socket. "
                    "`appliance console hash-password` makes a console.password_hash.")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--device", help="serial device, e.g. /dev/ttyAMA0, /dev/ttyS0, /dev/ttyGS0 "
                       "(default: console.device)")
    where.add_argument("--stdio", action="store_true", help="use stdin/stdout instead of a serial device")
    p.add_argument("--socket", help="control socket (default: <gateway.data_dir>/control.sock)")
    p.add_argument("--baudrate", type=int, help="default: console.baudrate (115200)")
    args = p.parse_args(argv)

    try:
        settings = read_settings(args.config)
    except SettingsError as exc:
        # Never fall back to no password because the file that holds it did not read.
        print(f"cannot start the console:\n{exc}", file=sys.stderr)
        return 2
    sock = Path(args.socket) if args.socket else socket_path(settings.data_dir)
    device = None if args.stdio else (args.device or settings.console.device)
    if not args.stdio and not device:
        print("no console device: give --device DEV or --stdio, or set console.device in the YAML",
              file=sys.stderr)
        return NO_DEVICE_EXIT
    baudrate = args.baudrate or settings.console.baudrate

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    client = ControlClient(sock, hello=f"console {device or 'stdio'}")
    common = {"gateway": settings.gateway, "password_hash": settings.console.password_hash,
              "open_access": settings.console.password == "none",
              "throttle": LoginThrottle(settings.data_dir / "console-login.json")}
    try:
        if args.stdio:
            term = StdioTerminal()
            try:
                Console(term, client, exit_on_logout=True, **common).run(stop)
            finally:
                term.close()
            return 0
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        return _serve_device(device, baudrate, client, stop, common)
    finally:
        client.close()


NO_DEVICE_EXIT = 3   # nothing to serve (not an error to retry): the image's unit stops restarting on it


def _serve_device(device: str, baudrate: int, client: ControlClient, stop: threading.Event, common: dict) -> int:
    """Serve the line for good: a port that fails (an unplugged adapter, a USB gadget whose
    host went away) is closed and reopened; the session starts afresh (logged out)."""
    from hal.drivers.serial.console_port import SerialException, open_console_port
    complained = False
    while not stop.is_set():
        try:
            port = open_console_port(device, baudrate, timeout=READ_TIMEOUT_S)
        except (SerialException, OSError) as exc:
            if not complained:
                log.error("console: cannot open %s: %s; retrying every %g s", device, exc, REOPEN_S)
                complained = True
            stop.wait(REOPEN_S)
            continue
        complained = False
        log.info("console on %s at %d 8N1", device, baudrate)
        try:
            Console(SerialTerminal(port), client, **common).run(stop)
        except (SerialException, OSError) as exc:
            log.warning("console: %s: %s; reopening", device, exc)
            stop.wait(REOPEN_S / 2)
        finally:
            try:
                port.close()
            except (SerialException, OSError):
                pass
    return 0


if __name__ == "__main__":
    sys.exit(console_main())
