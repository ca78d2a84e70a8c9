"""Read the hash-locked requirement files in this folder (the format pip and uv write).

Used by the lock tool, the image build (which wheels to fetch for aarch64), the SBOM and the
tests that hold a venv to its lock. Standard library only: the image build runs it as root
with the host's Python.
"""
from __future__ import annotations

import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
_LINE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)\s*(?:;\s*(?P<marker>[^\\]+?))?\s*$")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class Pin:
    name: str          # as written in the lock (normalised by canonical())
    version: str
    marker: str        # "" when the pin holds everywhere
    hashes: tuple[str, ...]
    text: str          # the whole entry, continuation lines included

    @property
    def key(self) -> str:
        return canonical(self.name)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read(path: Path) -> list[Pin]:
    """Every pinned entry of a lock file, in file order. Raises ValueError on an entry that is
    not `name==version [; marker]` followed by at least one sha256."""
    pins: list[Pin] = []
    entry: list[str] = []

    def close() -> None:
        if not entry:
            return
        text = "\n".join(entry)
        first = entry[0].rstrip("\\").strip()
        m = _LINE.match(first)
        hashes = tuple(_HASH.findall(text))
        if not m or not hashes:
            raise ValueError(f"{path}: not a pinned, hashed requirement: {first!r}")
        pins.append(Pin(m["name"], m["version"], (m["marker"] or "").strip(), hashes, text))
        entry.clear()

    for raw in path.read_text().splitlines():
        line = raw.rstrip()
        if not line or line.lstrip().startswith("#"):
            if entry and not entry[-1].endswith("\\"):
                close()
            continue
        if line.startswith((" ", "\t")):
            if not entry:
                raise ValueError(f"{path}: continuation line without a requirement: {line.strip()!r}")
            entry.append(line)
        else:
            close()
            entry.append(line)
    close()
    return pins


def environment(machine: str | None = None, python: tuple[int, int, int] | None = None) -> dict[str, str]:
    """PEP 508 marker values for Linux on `machine` with CPython `python` (default: this one)."""
    python = python or sys.version_info[:3]
    return {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
            "platform_machine": machine or platform.machine(), "implementation_name": "cpython",
            "platform_python_implementation": "CPython",
            "python_version": f"{python[0]}.{python[1]}",
            "python_full_version": ".".join(map(str, python))}


def applies(pin: Pin, env: dict[str, str]) -> bool:
    """Whether the pin's marker holds in env. The markers uv writes are comparisons joined by
    `and`/`or` with parentheses; they are evaluated here without the packaging library."""
    if not pin.marker:
        return True
    return _Marker(pin.marker, env).value()


class _Marker:
    _TOKEN = re.compile(r"\s*(\(|\)|not in\b|in\b|and\b|or\b|[a-z_]+|'[^']*'|\"[^\"]*\"|===|==|!=|~=|<=|>=|<|>)")

    def __init__(self, text: str, env: dict[str, str]) -> None:
        self.tokens, self.env, self.at = [], env, 0
        pos = 0
        while pos < len(text):
            m = self._TOKEN.match(text, pos)
            if not m:
                raise ValueError(f"cannot read marker {text!r} at {pos}")
            self.tokens.append(m.group(1))
            pos = m.end()
            while pos < len(text) and text[pos].isspace():
                pos += 1

    def _next(self) -> str:
        tok = self.tokens[self.at]
        self.at += 1
        return tok

    def value(self) -> bool:
        result = self._or()
        if self.at != len(self.tokens):
            raise ValueError(f"trailing tokens in marker: {self.tokens[self.at:]}")
        return result

    def _or(self) -> bool:
        result = self._and()
        while self.at < len(self.tokens) and self.tokens[self.at] == "or":
            self.at += 1
            rhs = self._and()
            result = result or rhs
        return result

    def _and(self) -> bool:
        result = self._atom()
        while self.at < len(self.tokens) and self.tokens[self.at] == "and":
            self.at += 1
            rhs = self._atom()
            result = result and rhs
        return result

    def _operand(self, tok: str) -> str:
        if tok[0] in "'\"":
            return tok[1:-1]
        if tok not in self.env:
            raise ValueError(f"unknown marker variable {tok}")
        return self.env[tok]

    def _atom(self) -> bool:
        tok = self._next()
        if tok == "(":
            result = self._or()
            if self._next() != ")":
                raise ValueError("unbalanced parentheses in marker")
            return result
        op, right_tok = self._next(), self._next()
        left, right = self._operand(tok), self._operand(right_tok)
        if op in ("in", "not in"):
            return (left in right) == (op == "in")
        if tok.endswith("version") or right_tok.endswith("version"):
            return _compare_versions(left, op, right)
        return {"==": left == right, "!=": left != right, "===": left == right}.get(op, False)


def _compare_versions(left: str, op: str, right: str) -> bool:
    """PEP 440 for the release numbers markers compare (3.11, 3.11.2, 3.11.*)."""
    if op in ("==", "!=") and right.endswith(".*"):
        prefix = _version(right[:-2])
        equal = _version(left)[:len(prefix)] == prefix
        return equal if op == "==" else not equal
    a, b = _version(left), _version(right)
    width = max(len(a), len(b))
    a, b = a + (0,) * (width - len(a)), b + (0,) * (width - len(b))
    if op == "~=":
        return a >= b and a[:len(_version(right)) - 1] == b[:len(_version(right)) - 1]
    return {"==": a == b, "===": left == right, "!=": a != b, "<": a < b, ">": a > b, "<=": a <= b,
            ">=": a >= b}[op]


def _version(text: str) -> tuple:
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0]))


def pins_for(path: Path, machine: str | None = None,
             python: tuple[int, int, int] | None = None) -> dict[str, Pin]:
    """The pins of a lock that apply on `machine` with `python`, by canonical name."""
    env = environment(machine, python)
    chosen: dict[str, Pin] = {}
    for pin in read(path):
        if applies(pin, env):
            if pin.key in chosen:
                raise ValueError(f"{path}: {pin.name} is pinned twice for {env['platform_machine']} "
                                 f"Python {env['python_full_version']}")
            chosen[pin.key] = pin
    return chosen
