"""NMEA 0183: line splitting, checksums, GGA/RMC/VTG decoding, and assembling fixes.

A sentence is `$` (or `!`), an address (talker + type, e.g. GPGGA, GNRMC), comma-separated
fields, `*hh` (XOR of every byte between `$` and `*`, two hex digits) and CR LF. Any talker is
accepted (GP GPS, GN multi-constellation, GL, GA, GB/BD, GQ, ...): decoding goes by the type.

Nothing here raises on bad input except with NmeaError (BadLine or BadChecksum); a line is
bytes from the wire, possibly binary noise, so it is decoded as ASCII only after checks.

Fix assembly. A receiver reports one epoch (one position solution) in several sentences that
share the UTC time field: GGA (fix quality, satellites, position, altitude) and RMC (status,
position, speed, course), sometimes VTG (speed, course, no time). FixAssembler merges them into
one Fix per epoch. It learns which of GGA/RMC the receiver sends (from the first epoch, which
is therefore emitted only when the second begins) and then emits each epoch as soon as all of
them are in; an epoch that misses one is emitted when the next epoch starts (or by flush(),
which the source calls when the line has been quiet for most of a fix period).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

KNOT_M_S = 1852.0 / 3600.0      # one knot in m/s (exact: the international nautical mile)
KMH_M_S = 1.0 / 3.6

# Channel names a fix provides, in order, and their units.
FIX_CHANNELS = ("fix_quality", "satellites", "latitude", "longitude", "altitude", "speed", "course", "hdop")
FIX_UNITS = {"fix_quality": "", "satellites": "count", "latitude": "deg", "longitude": "deg",
             "altitude": "m", "speed": "m/s", "course": "deg", "hdop": ""}

_HEX = b"0123456789ABCDEFabcdef"


class NmeaError(ValueError):
    pass


class BadLine(NmeaError):
    """Not a usable sentence: no $, not printable ASCII, too long, missing/garbled fields."""


class BadChecksum(NmeaError):
    def __init__(self, line: bytes, computed: int, stated: int) -> None:
        super().__init__(f"checksum *{stated:02X} but the sentence sums to {computed:02X}")
        self.computed, self.stated = computed, stated


def checksum(body: bytes | str) -> int:
    """XOR of the bytes between '$' and '*'."""
    data = body.encode("ascii") if isinstance(body, str) else body
    value = 0
    for b in data:
        value ^= b
    return value


def make_sentence(body: str) -> str:
    """'GPGGA,...' -> '$GPGGA,...*hh' (for simulators and tests)."""
    return f"${body}*{checksum(body):02X}"


@dataclass(frozen=True)
class Sentence:
    talker: str           # "GP", "GN", ... ("P" + maker for proprietary sentences)
    kind: str             # "GGA", "RMC", ...
    fields: tuple[str, ...]
    has_checksum: bool


def parse_sentence(line: bytes, require_checksum: bool = True) -> Sentence:
    """One line (without CR LF) -> Sentence. Raises BadLine or BadChecksum."""
    line = line.strip(b"\r\n ")
    if not line:
        raise BadLine("empty line")
    if line[:1] not in (b"$", b"!"):
        raise BadLine("does not start with $ or !")
    if any(b < 0x20 or b > 0x7E for b in line):
        raise BadLine("contains non-printable or non-ASCII bytes")
    star = line.rfind(b"*")
    if star >= 0:
        body, tail = line[1:star], line[star + 1:]
        if len(tail) != 2 or any(c not in _HEX for c in tail):
            raise BadLine(f"malformed checksum field {tail[:8]!r}")
        stated, computed = int(tail, 16), checksum(body)
        if stated != computed:
            raise BadChecksum(line, computed, stated)
    elif require_checksum:
        raise BadLine("no *hh checksum")
    else:
        body = line[1:]
    parts = body.decode("ascii").split(",")
    address = parts[0]
    if address.startswith("P") and len(address) >= 2:          # proprietary: $PUBX, $PMTK...
        talker, kind = "P", address[1:]
    elif len(address) == 5 and address.isalnum():
        talker, kind = address[:2], address[2:]
    else:
        raise BadLine(f"malformed address field {address[:12]!r}")
    return Sentence(talker, kind, tuple(parts[1:]), star >= 0)


class LineSplitter:
    """Bytes from the port -> lines. A line longer than max_line is dropped up to its newline
    and reported as None (the caller counts it), so a stream of binary noise without newlines
    cannot grow memory."""

    def __init__(self, max_line: int = 200) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._overlong = False

    def feed(self, data: bytes) -> Iterator[bytes | None]:
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > self.max_line:
                    if not self._overlong:
                        self._overlong = True
                        yield None
                    del self._buf[:]
                return
            line = bytes(self._buf[:nl])
            del self._buf[:nl + 1]
            if self._overlong:
                self._overlong = False          # the tail of a line already reported
                continue
            if len(line) > self.max_line:
                yield None
                continue
            yield line.rstrip(b"\r")

    def reset(self) -> None:
        self._buf.clear()
        self._overlong = False


# ---------------------------------------------------------------- field decoding

def _float(text: str, what: str) -> float | None:
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise BadLine(f"{what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise BadLine(f"{what} {text!r} is not finite")
    return value


def _int(text: str, what: str) -> int | None:
    if text == "":
        return None
    if not text.isdigit():
        raise BadLine(f"{what} {text!r} is not an integer")
    return int(text)


def parse_coordinate(value: str, hemisphere: str, degree_digits: int) -> float | None:
    """'4404.1306','N' (ddmm.mmmm; dddmm.mmmm for longitude) -> decimal degrees, south and west
    negative. None when the receiver leaves the field empty."""
    if value == "" and hemisphere == "":
        return None
    what = "latitude" if degree_digits == 2 else "longitude"
    dot = value.find(".")
    whole = value if dot < 0 else value[:dot]
    if len(whole) != degree_digits + 2 or not whole.isdigit():
        raise BadLine(f"{what} {value!r} is not {'d' * degree_digits}mm.mmm")
    degrees = int(whole[:degree_digits])
    minutes = _float(value[degree_digits:], what)
    if minutes is None or minutes >= 60:
        raise BadLine(f"{what} {value!r}: minutes out of range")
    result = degrees + minutes / 60.0
    limit = 90.0 if degree_digits == 2 else 180.0
    if result > limit:
        raise BadLine(f"{what} {value!r} is beyond {limit:g} degrees")
    positive, negative = ("N", "S") if degree_digits == 2 else ("E", "W")
    if hemisphere == negative:
        return -result
    if hemisphere != positive:
        raise BadLine(f"{what} hemisphere {hemisphere!r} is not {positive} or {negative}")
    return result


def _need(s: Sentence, n: int) -> None:
    if len(s.fields) < n:
        raise BadLine(f"{s.kind} has {len(s.fields)} fields, expected at least {n}")


def parse_gga(s: Sentence) -> dict:
    """GGA: time, lat, N/S, lon, E/W, quality, satellites, HDOP, altitude, M, geoid sep., M, ..."""
    _need(s, 9)
    f = s.fields
    return {"time": f[0],
            "latitude": parse_coordinate(f[1], f[2], 2),
            "longitude": parse_coordinate(f[3], f[4], 3),
            "fix_quality": _int(f[5], "fix quality"),
            "satellites": _int(f[6], "satellites"),
            "hdop": _float(f[7], "HDOP"),
            "altitude": _float(f[8], "altitude")}


def parse_rmc(s: Sentence) -> dict:
    """RMC: time, status A/V, lat, N/S, lon, E/W, speed (knots), course (deg true), date, ..."""
    _need(s, 8)
    f = s.fields
    if f[1] not in ("A", "V", ""):
        raise BadLine(f"RMC status {f[1]!r} is not A or V")
    knots = _float(f[6], "speed")
    return {"time": f[0],
            "status": f[1],
            "latitude": parse_coordinate(f[2], f[3], 2),
            "longitude": parse_coordinate(f[4], f[5], 3),
            "speed": None if knots is None else knots * KNOT_M_S,
            "course": _float(f[7], "course")}


def parse_vtg(s: Sentence) -> dict:
    """VTG: course true, T, course magnetic, M, speed knots, N, speed km/h, K, [mode]."""
    _need(s, 7)
    f = s.fields
    knots = _float(f[4], "speed")
    if knots is not None:
        speed = knots * KNOT_M_S
    else:
        kmh = _float(f[6], "speed")
        speed = None if kmh is None else kmh * KMH_M_S
    return {"course": _float(f[0], "course"), "speed": speed}


# ---------------------------------------------------------------- fixes

@dataclass
class Fix:
    """One epoch. Values the receiver did not report are None (NaN in a Block)."""

    time: str                                  # hhmmss.ss as sent, "" if the receiver left it empty
    arrival_ns: int = 0                        # wall clock when its last sentence arrived
    sentences: set[str] = field(default_factory=set)
    fix_quality: float | None = None        # GGA 0 invalid, 1 GPS, 2 DGPS, 4 RTK fixed, 5 RTK float, 6 dead reckoning
    satellites: float | None = None
    latitude: float | None = None           # decimal degrees, south negative
    longitude: float | None = None          # decimal degrees, west negative
    altitude: float | None = None           # m above mean sea level
    speed: float | None = None              # m/s over ground
    course: float | None = None             # degrees true
    hdop: float | None = None
    rmc_status: str | None = None

    @property
    def seconds_of_day(self) -> float | None:
        """The receiver's UTC time of the fix in seconds since midnight; None if it sent none."""
        t = self.time
        try:
            return int(t[0:2]) * 3600 + int(t[2:4]) * 60 + float(t[4:])
        except (ValueError, IndexError):
            return None

    def values(self, channels: tuple[str, ...] = FIX_CHANNELS) -> list[float]:
        out = []
        for ch in channels:
            v = getattr(self, ch)
            if ch == "fix_quality" and v is None and self.rmc_status:
                v = 1.0 if self.rmc_status == "A" else 0.0     # RMC alone: valid or not
            out.append(math.nan if v is None else float(v))
        return out

    def merge(self, kind: str, data: dict, arrival_ns: int) -> None:
        self.sentences.add(kind)
        self.arrival_ns = arrival_ns
        if kind == "GGA":
            for key in ("fix_quality", "satellites", "latitude", "longitude", "altitude", "hdop"):
                if data[key] is not None:
                    setattr(self, key, data[key])
        elif kind == "RMC":
            self.rmc_status = data["status"]
            for key in ("latitude", "longitude"):     # GGA's position, when both sent it, is the same fix
                if getattr(self, key) is None and data[key] is not None:
                    setattr(self, key, data[key])
            for key in ("speed", "course"):
                if data[key] is not None:
                    setattr(self, key, data[key])
        elif kind == "VTG":
            for key in ("speed", "course"):
                if getattr(self, key) is None and data[key] is not None:
                    setattr(self, key, data[key])


EPOCH_SENTENCES = ("GGA", "RMC")
_PARSERS = {"GGA": parse_gga, "RMC": parse_rmc, "VTG": parse_vtg}


def decode(s: Sentence) -> dict | None:
    """Fields of a sentence the fix uses, or None for sentence types it ignores (GSA, GSV, ...)."""
    parser = _PARSERS.get(s.kind)
    return None if parser is None else parser(s)


class FixAssembler:
    def __init__(self) -> None:
        self.expected: set[str] = set()      # the epoch sentences this receiver has been seen to send
        self._learning = True                # until the first epoch boundary, epochs end only there
        self._pending: Fix | None = None
        self._last_time: str | None = None

    def add(self, kind: str, data: dict, arrival_ns: int) -> list[Fix]:
        """Feed one decoded sentence; returns the fixes it completes (0, 1 or 2)."""
        out: list[Fix] = []
        if kind == "VTG":                    # no time of its own: it belongs to the epoch being read
            if self._pending is not None:
                self._pending.merge(kind, data, arrival_ns)
            return out
        self.expected.add(kind)
        epoch = data["time"]
        if self._pending is not None and epoch != self._pending.time:
            out.append(self.flush())
            self._learning = False
        if self._pending is None:
            if epoch and epoch == self._last_time:
                return out                   # a late sentence of an epoch already emitted
            self._pending = Fix(time=epoch)
        self._pending.merge(kind, data, arrival_ns)
        if not self._learning and self._pending.sentences >= self.expected:
            out.append(self.flush())
        return out

    def flush(self) -> Fix | None:
        fix, self._pending = self._pending, None
        if fix is not None:
            self._last_time = fix.time
        return fix

    @property
    def pending_since_ns(self) -> int | None:
        return None if self._pending is None else self._pending.arrival_ns
