"""The host calls every module has: ap.log, ap.feature, ap.features, ap.event, ap.state_changed.

They collect what the module reports during one export call into Calls; the worker sends it
to the supervisor when the call returns."""
from __future__ import annotations

import struct
from typing import Callable

from appliance.runtime.hostcalls import abi
from appliance.runtime.hostcalls.abi import MAX_EVENTS, MAX_FEATURES, MAX_LOG_BYTES, MAX_LOGS_PER_CALL, \
    AbiViolation

IMPORTS = ("log", "feature", "features", "event", "state_changed")


class Calls:
    """What the module reported during the current export call."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.features: dict[str, float] = {}
        self.events: list[list] = []
        self.logs: list[list] = []
        self.logs_dropped = 0
        self.state_changed = False


class CoreCalls:
    """The five core imports, bound to one instance's memory and one Calls record."""

    IMPORTS = IMPORTS

    def __init__(self, memory: Callable[[], memoryview], calls: Calls) -> None:
        self.memory, self.calls = memory, calls
        self._valid_names: dict[bytes, str] = {}               # names modules repeat every window
        self._batch_names: dict[bytes, tuple[str, ...]] = {}   # packed name lists already checked

    def log(self, level: int, ptr: int, length: int) -> None:
        raw = abi.read(self.memory(), ptr, min(length, MAX_LOG_BYTES), "ap.log")
        if len(self.calls.logs) >= MAX_LOGS_PER_CALL:
            self.calls.logs_dropped += 1
            return
        self.calls.logs.append([int(level), abi.text(raw)])

    def feature(self, ptr: int, length: int, value: float) -> None:
        if length > 64:
            raise AbiViolation(f"ap.feature: name of {length} bytes (max 64)")
        raw = abi.read(self.memory(), ptr, length, "ap.feature")
        name = self._valid_names.get(raw)
        if name is None:
            if not abi.FEATURE_NAME.fullmatch(raw):
                raise AbiViolation(f"ap.feature: invalid name {raw[:64]!r}")
            name = raw.decode()
            if len(self._valid_names) < 4 * MAX_FEATURES:
                self._valid_names[raw] = name
        features = self.calls.features
        if len(features) >= MAX_FEATURES and name not in features:
            raise AbiViolation(f"ap.feature: more than {MAX_FEATURES} features in one window")
        features[name] = float(value)

    def features(self, names_ptr: int, names_len: int, values_ptr: int, count: int) -> None:
        """ap.features: count names, each ended by a 0 byte, and count float64 values."""
        if not 1 <= count <= MAX_FEATURES:
            raise AbiViolation(f"ap.features: count={count} (1..{MAX_FEATURES})")
        if not 0 <= names_len <= 65 * count:
            raise AbiViolation(f"ap.features: {names_len} bytes of names for {count} names (max 65 each)")
        mem = self.memory()
        raw = abi.read(mem, names_ptr, names_len, "ap.features")
        names = self._batch_names.get(raw)
        if names is None:
            parts = raw.split(b"\0")
            if len(parts) != count + 1 or parts[-1]:
                raise AbiViolation(f"ap.features: {names_len} bytes of names do not hold {count} names, "
                                   "each ended by a 0 byte")
            for part in parts[:-1]:
                if not abi.FEATURE_NAME.fullmatch(part):
                    raise AbiViolation(f"ap.features: invalid name {part[:64]!r}")
            names = tuple(part.decode() for part in parts[:-1])
            if len(self._batch_names) < 64:
                self._batch_names[raw] = names
        values = struct.unpack(f"<{count}d", abi.read(mem, values_ptr, 8 * count, "ap.features"))
        self.calls.features.update(zip(names, values))
        if len(self.calls.features) > MAX_FEATURES:
            raise AbiViolation(f"ap.features: more than {MAX_FEATURES} features in one window")

    def event(self, severity: int, score: float, ptr: int, length: int) -> None:
        if not 0 <= severity <= 3:
            raise AbiViolation(f"ap.event: severity {severity} (must be 0..3)")
        if len(self.calls.events) >= MAX_EVENTS:
            raise AbiViolation(f"ap.event: more than {MAX_EVENTS} events in one window")
        msg = abi.text(abi.read(self.memory(), ptr, min(length, MAX_LOG_BYTES), "ap.event"))
        self.calls.events.append([int(severity), float(score), msg])

    def state_changed(self) -> None:
        self.calls.state_changed = True

    def imports(self) -> dict:
        return {("ap", name): getattr(self, name) for name in self.IMPORTS}
