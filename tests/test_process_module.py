"""The process module (modules/src/process, docs/modules/process.md): rules on process values per
signal (range, rate of change, stuck, drift, no data) and GPS rules (loss of fix, position jump).

- Unit level: one instance under wasm3 in this process, fed sample by sample or window by
  window, for every rule's edges, the params it refuses, the evidence, overlapping windows and
  gaps; one refusal through a real worker process.
- Modbus: the real supervisor polls a pymodbus RTU server on a pty whose register the test drives
  (normal, out of range, back, a spike, held constant, a slow drift; a slave that stops answering)
  and the spool must hold exactly the expected events.
- NMEA: the recorded GPS logs written into ptys through the nmea source: no events on the real
  logs; a log altered by the test (fix lost, a 5 km jump) raises exactly loss of fix and jump.
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from appliance.events.spool import Spool
from appliance_tools.modbuild import build_module
from appliance.runtime.wire import HEADER, load_message, pack_header
from appliance.runtime.process import ModuleFault, WorkerProcess
from conftest import SHARED_DATA, require
from hal.drivers.serial.nmea import make_sentence
from hal.source import Health
from hal.sim.nmea_receiver import split_epochs
from serialpeers import ModbusPeer, NmeaWriter, RegisterDriver
from support import wait_for, write_config

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "modules" / "src" / "process"
BAUD = 115200
EARTH_RADIUS_M = 6371008.8


@pytest.fixture(scope="module")
def process_wasm(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("process") / "process.wasm"
    result = build_module(SRC, out)
    assert result.ok, result.problems
    return out


def params_text(params: dict) -> str:
    return "".join(f"{k}={v}\n" for k, v in sorted(params.items()))


class Proc:
    """One module instance under wasm3 with the ABI v1 host imports it uses."""

    def __init__(self, wasm: Path, params: dict | str):
        import wasm3
        self.env = wasm3.Environment()
        self.rt = self.env.new_runtime(128 << 10)
        self.mod = self.env.parse_module(wasm.read_bytes())
        self.rt.load(self.mod)
        self.logs: list[tuple[int, str]] = []
        self.events: list[tuple[int, float, str]] = []
        self.features: dict[str, float] = {}
        self.event_features: list[dict[str, float]] = []   # the features of each event's window
        link = self.mod.link_function
        link("ap", "log", "v(iii)", lambda level, p, n: self.logs.append((level, self._text(p, n))))
        link("ap", "feature", "v(iiF)", self._feature)
        link("ap", "event", "v(iFii)", lambda sev, score, p, n: self.events.append((sev, score, self._text(p, n))))
        data = (params if isinstance(params, str) else params_text(params)).encode()
        p = self.call("ap_buffer", 0, len(data))
        self.mem()[p:p + len(data)] = data
        self.rc = self.call("ap_init", p, len(data))
        self.seq = 0
        self.samples = 0        # samples fed so far (the clock)

    def call(self, name: str, *args):
        return self.rt.find_function(name)(*args)

    def mem(self):
        return self.rt.get_memory(0)

    def _text(self, p: int, n: int) -> str:
        return bytes(self.mem()[p:p + n]).decode()

    def _feature(self, p: int, n: int, value: float) -> None:
        name = self._text(p, n)
        assert len(name) <= 64 and re.fullmatch(r"[A-Za-z0-9_.:-]+", name), name
        self.features[name] = value

    def window(self, x, fs: float, seq: int, start_ns: int, dropped: int = 0) -> int:
        x = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
        data = pack_header(x.shape[0], x.shape[1], fs, seq, start_ns, dropped) + x.tobytes()
        wp = self.call("ap_buffer", 1, len(data))
        assert wp, "module refused the window size"
        self.mem()[wp:wp + len(data)] = data
        self.features = {}
        before = len(self.events)
        rc = self.call("ap_process", wp, len(data))
        assert len(self.events) - before <= 16 and len(self.features) <= 256
        self.event_features += [dict(self.features)] * (len(self.events) - before)
        return rc

    def samples_one_by_one(self, x, fs: float = 10.0) -> list[tuple[int, int, str]]:
        """Each sample as its own window (back to back, a regular clock); returns the new events
        as (sample index, severity, message)."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        out = []
        for i in range(x.shape[1]):
            before = len(self.events)
            assert self.window(x[:, i:i + 1], fs, self.seq, round(self.samples * 1e9 / fs)) == 0, self.logs
            self.seq += 1
            self.samples += 1
            out += [(i, sev, msg) for sev, _, msg in self.events[before:]]
        return out


def feed_windows(wasm: Path, params: dict, x: np.ndarray, fs: float, size: int, hop: int,
                 clock: bool = True) -> Proc:
    """x (channels, samples) cut as the appliance's windower cuts it. clock=False stamps windows
    as a fast NMEA replay does (arrival times, far closer together than the nominal rate)."""
    p = Proc(wasm, params)
    assert p.rc == 0, p.logs
    for seq, i in enumerate(range(0, x.shape[1] - size + 1, hop)):
        start = round(i * 1e9 / fs) if clock else 1_000_000 * seq
        assert p.window(x[:, i:i + size], fs, seq, start) == 0, p.logs
    return p


def haversine(lat1, lon1, lat2, lon2) -> float:
    p1, p2, dp, dl = map(math.radians, (lat1, lat2, lat2 - lat1, lon2 - lon1))
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(h))


# ================================================================== params

BAD_PARAMS = [
    ({"signal.0.min": 90, "signal.0.max": 10}, "signal.0 (ch0): min 90 must be less than max 10"),
    ({"signal.0.name": "oil_temp", "signal.0.min": 5, "signal.0.max": 5},
     "signal.0 (oil_temp): min 5 must be less than max 5"),
    ({"signal.0.stuck_samples": -3}, "signal.0.stuck_samples: -3 is negative"),
    ({"signal.0.missing_max": -1}, "signal.0.missing_max: -1 is negative"),
    ({"signal.0.max": 1, "clear_samples": -2}, "clear_samples: -2 is negative"),
    ({"gps.fix": 0, "gps.fix_lost_samples": -5}, "gps.fix_lost_samples: -5 is negative"),
    ({"signal.0.stuck_samples": 2.5}, "signal.0.stuck_samples: must be a whole number"),
    ({"signal.0.stuck_samples": 1}, "signal.0.stuck_samples: must be at least 2"),
    ({"signal.0.max": "hot"}, "signal.0.max: not a number"),
    ({"signal.0.max": 1, "signal.0.rate_mx": 2}, "unknown param signal.0.rate_mx (signal keys: name, min"),
    ({"signal.0.max": 1, "signal.0.drift.slack": 2}, "unknown param signal.0.drift.slack"),
    ({"signal.0.max": 1, "threshold": 2}, "unknown param threshold (known: signal.<N>.*"),
    ({"signal.32.max": 1}, "signal.32.max: channel index beyond 31 (at most 32 signals)"),
    ({"signal.x.max": 1}, "signal.x.max: expected signal.<channel index>.<key>"),
    ({"gps.fix": 32, "gps.fix_lost_samples": 3}, "gps.fix: channel index beyond 31"),
    ({"signal.0.rate_max": 0}, "signal.0.rate_max: must be positive"),
    ({"signal.0.max": 1, "severity.range": "loud"}, "severity.range: severity must be info, warning, alarm"),
    ({"signal.0.max": 1, "signal.0.severity.jump": "alarm"}, "signal.0.severity.jump: unknown rule"),
    ({"signal.0.name": "oil temp", "signal.0.max": 1}, "signal.0.name: a name uses only letters"),
    ({"signal.0.name": "a", "signal.0.max": 1, "signal.1.name": "a", "signal.1.max": 2},
     "signal.1 (a): the same name as another signal"),
    ({"signal.0.name": "oil_temp"}, "signal.0 (oil_temp): no rule"),
    ({"signal.0.stuck_tolerance": 0.5, "signal.0.max": 1}, "stuck_tolerance needs stuck_samples"),
    ({"signal.0.drift.k": 1}, "a CUSUM drift rule needs drift.h"),
    ({"signal.0.drift.h": 10}, "drift needs exactly one of drift.target and drift.learn"),
    ({"signal.0.drift.h": 10, "signal.0.drift.target": 1, "signal.0.drift.learn": 10},
     "drift needs exactly one of drift.target and drift.learn"),
    ({"signal.0.drift.ewma": 0.2, "signal.0.drift.limit": 1, "signal.0.drift.h": 3, "signal.0.drift.target": 0},
     "not both"),
    ({"signal.0.drift.ewma": 1.5, "signal.0.drift.limit": 1, "signal.0.drift.target": 0},
     "signal.0.drift.ewma: must be in (0, 1]"),
    ({"signal.0.drift.h": 3, "signal.0.drift.target": 0, "signal.0.drift.direction": "sideways"},
     "must be up, down or both"),
    ({"gps.lat": 2, "gps.max_speed_mps": 30}, "gps: give both gps.lat and gps.lon"),
    ({"gps.fix_lost_samples": 3}, "gps.fix_lost_samples needs gps.fix"),
    ({"gps.fix": 0}, "gps: no rule"),
    ({}, "no rules: configure signal.<N>.*"),
]


@pytest.mark.parametrize("params,message", BAD_PARAMS, ids=[m[:40] for _, m in BAD_PARAMS])
def test_bad_params_are_refused_with_the_reason(process_wasm, params, message):
    p = Proc(process_wasm, params)
    assert p.rc != 0
    assert len(p.logs) == 1 and p.logs[0][0] == 3 and message in p.logs[0][1], p.logs


def test_a_refusal_reaches_the_host_as_a_params_fault(process_wasm):
    text = params_text({"signal.0.name": "oil_temp", "signal.0.min": 90, "signal.0.max": 10, "host.dsp": 1})
    with pytest.raises(ModuleFault) as info:
        WorkerProcess("process", process_wasm.read_bytes(), HEADER.size + 4 * 16, load_message("process.wasm", text))
    assert info.value.kind == "params"
    assert info.value.reason == "module rejected its params: signal.0 (oil_temp): min 90 must be less than max 10"


def test_every_documented_key_is_accepted(process_wasm):
    params = {"clear_samples": 3, "decimals": 1, "severity.range": "critical", "severity.jump": 2, "host.dsp": 1,
              "signal.0.name": "oil_temp", "signal.0.min": -10, "signal.0.max": 90.5, "signal.0.rate_max": 2,
              "signal.0.stuck_samples": 30, "signal.0.stuck_tolerance": 0.05, "signal.0.missing_max": 0,
              "signal.0.drift.target": 60, "signal.0.drift.k": 0.5, "signal.0.drift.h": 20,
              "signal.0.drift.direction": "up", "signal.0.decimals": 2, "signal.0.clear_samples": 10,
              "signal.0.severity.stuck": "info", "signal.31.name": "p", "signal.31.drift.learn": 100,
              "signal.31.drift.ewma": 0.1, "signal.31.drift.limit": 0.3,
              "gps.fix": 0, "gps.lat": 2, "gps.lon": 3, "gps.name": "rover", "gps.fix_lost_samples": 5,
              "gps.max_speed_mps": 40, "gps.clear_samples": 2, "gps.severity.fix_lost": "alarm"}
    p = Proc(process_wasm, params)
    assert p.rc == 0 and p.logs == []


# ================================================================== rules, sample by sample

def test_range_edges_hysteresis_and_evidence(process_wasm):
    p = Proc(process_wasm, {"signal.0.name": "oil_temp", "signal.0.min": 10, "signal.0.max": 90})
    nan = math.nan
    x = [50, 90, 10, 88.5, 93.4, 95, 91, 89, 80, nan, 70, 60, 92, 50, 50, 50, 50, 50, 5]
    ev = p.samples_one_by_one(x)
    # 90 and 10 are inside (the limits are inclusive); 93.4 raises once (95 and 91 are the same
    # story); 89, 80, (NaN: no verdict), 70, 60 are 4 passes, then 92 fails again; 5 x 50 clear;
    # 5 raises again.
    assert [(i, sev) for i, sev, _ in ev] == [(4, 2), (17, 0), (18, 2)]
    assert ev[0][2] == "oil_temp out of range: 93.4 > max 90 (last 5: 50 90 10 88.5 93.4)"
    assert ev[1][2] == ("oil_temp back to normal (out of range cleared after 5 samples): value 50, within [10, 90] "
                        "(last 8: 70 60 92 50 50 50 50 50)")
    assert ev[2][2] == "oil_temp out of range: 5 < min 10 (last 8: 60 92 50 50 50 50 50 5)"
    f = p.event_features[0]
    assert f["oil_temp.range.value"] == pytest.approx(93.4, abs=1e-5)
    assert f["oil_temp.range.limit"] == 90 and f["oil_temp.range.observed"] == pytest.approx(93.4, abs=1e-5)
    assert [f[f"oil_temp.range.history.{i}"] for i in range(5)] == pytest.approx([50, 90, 10, 88.5, 93.4])
    assert "oil_temp.range.history.5" not in f
    assert p.events[0][1] == pytest.approx(1 + 3.4 / 80, abs=1e-5)   # score: 1 + excess / range width

    # One-sided limits, per-rule severity, per-signal clear_samples and decimals.
    p = Proc(process_wasm, {"signal.0.name": "pressure", "signal.0.max": 5, "signal.0.decimals": 3,
                            "signal.0.clear_samples": 2, "signal.0.severity.range": "critical"})
    ev = p.samples_one_by_one([4.9, 5.0, 5.1234, 4, 4, -1e6])
    assert [(i, sev) for i, sev, _ in ev] == [(2, 3), (4, 0)]
    assert ev[0][2].startswith("pressure out of range: 5.123 > max 5 (")
    assert ev[1][2].startswith("pressure back to normal (out of range cleared after 2 samples): value 4, within max 5")


def test_rate_of_change_edges(process_wasm):
    p = Proc(process_wasm, {"signal.0.name": "level", "signal.0.rate_max": 5})   # units per second, at 10 Hz
    nan = math.nan
    x = [0, 0.5, 1.0, 1.5,        # 0.5 per sample = exactly 5/s: passes
         2.25,                    # 7.5/s: raises
         2.5, 2.75, 3.0, 3.25,    # passes
         nan, 4.25,               # 1.0 over two sample intervals = 5/s: passes (5th): clears
         0]                       # 42.5/s
    ev = p.samples_one_by_one(x)
    assert [(i, sev) for i, sev, _ in ev] == [(4, 1), (10, 0), (11, 1)]
    assert ev[0][2] == "level rate of change: 7.5/s > rate_max 5/s (1.5 to 2.25 in 0.1 s) (last 5: 0 0.5 1 1.5 2.25)"
    assert "level back to normal (rate of change cleared after 5 samples): value 4.25, rate 5/s" in ev[1][2]
    assert ev[2][2].startswith("level rate of change: 42.5/s > rate_max 5/s (4.25 to 0 in 0.1 s)")
    f = p.event_features[0]
    assert (f["level.rate.observed"], f["level.rate.limit"], f["level.rate.value"]) == pytest.approx((7.5, 5, 2.25))
    # The first sample has nothing to compare with: a large first value is not a jump.
    assert Proc(process_wasm, {"signal.0.rate_max": 1}).samples_one_by_one([1000, 1000.05]) == []


def test_stuck_edges(process_wasm):
    p = Proc(process_wasm, {"signal.0.name": "flow", "signal.0.stuck_samples": 5})
    nan = math.nan
    ev = p.samples_one_by_one([3, 3, 3, 3, 4, 4, 4, nan, 4, 4, 4, 5, 6, 7, 8, 9])
    # 3 x4: not yet; 4 x5 with a NaN inside (skipped, does not break the run): raises at the 5th 4;
    # 5, 6, 7, 8, 9 change: cleared at the 5th change.
    assert [(i, sev) for i, sev, _ in ev] == [(9, 1), (15, 0)]
    assert ev[0][2] == "flow stuck: 5 samples within 0 of 4 >= stuck_samples 5 (last 8: 3 3 4 4 4 nan 4 4)"
    # With a tolerance the band (max - min of the run) must stay within it.
    p = Proc(process_wasm, {"signal.0.name": "t", "signal.0.stuck_samples": 4, "signal.0.stuck_tolerance": 0.25})
    ev = p.samples_one_by_one([1.0, 1.125, 1.25, 1.0, 1.375, 1.25, 1.25, 1.5, 1.5])
    # 1.0..1.25 is a band of 0.25 (4 samples): raises at index 3. 1.375 widens it past 0.25: a new run
    # 1.375, 1.25, 1.25, 1.5 (band 0.25): 4 samples again at index 7, still the same open event.
    assert [(i, sev) for i, sev, _ in ev] == [(3, 1)]
    assert "t stuck: 4 samples within 0.25 of 1 >= stuck_samples 4" in ev[0][2]


def test_no_data_edges(process_wasm):
    p = Proc(process_wasm, {"signal.0.name": "flow", "signal.0.missing_max": 3, "signal.0.max": 100})
    nan = math.nan
    ev = p.samples_one_by_one([1, nan, nan, nan, 2, nan, nan, nan, nan, nan, 3, 4, 5, 6, 150, 7])
    # 3 NaNs in a row is allowed; the 4th raises; values back: the 5th value clears (150 is out of
    # range, its own rule, but it is a value: it counts for no-data).
    assert [(i, sev, m.split(":")[0]) for i, sev, m in ev] == [
        (8, 1, "flow no data"), (14, 0, "flow back to normal (no data cleared after 5 samples)"),
        (14, 2, "flow out of range")]
    assert ev[0][2] == ("flow no data: 4 samples in a row without a value > missing_max 3 "
                        "(last 8: nan nan nan 2 nan nan nan nan)")
    assert p.event_features[0]["flow.missing.observed"] == 4 and p.event_features[0]["flow.missing.limit"] == 3
    # missing_max 0: any NaN is "no data"; +-inf counts as no value too.
    assert [i for i, _, _ in Proc(process_wasm, {"signal.0.missing_max": 0}).samples_one_by_one([1, math.inf])] == [1]


def cusum_reference(x, target, k, h, learn=0):
    """(index, statistic, target) where S+ or S- first exceeds h, or None; float64 on float32 inputs."""
    x = [float(v) for v in np.asarray(x, dtype=np.float32)]
    x0 = 0
    if learn:
        total = 0.0
        for v in x[:learn]:                 # the module's order of additions
            total += v
        target, x0 = total / learn, learn
    sp = sn = 0.0
    for i in range(x0, len(x)):
        sp = max(0.0, sp + (x[i] - target - k))
        sn = max(0.0, sn + (target - x[i] - k))
        if max(sp, sn) > h:
            return i, max(sp, sn), target
    return None


def test_cusum_drift_matches_a_reference(process_wasm):
    rng = np.random.default_rng(7)
    x = np.r_[20 + rng.normal(0, 0.3, 200), 20 + np.linspace(0, 3, 150) + rng.normal(0, 0.3, 150)]
    ref_i, ref_s, ref_target = cusum_reference(x, 0, 0.5, 15, learn=50)
    p = Proc(process_wasm, {"signal.0.name": "bearing_temp", "signal.0.drift.learn": 50,
                            "signal.0.drift.k": 0.5, "signal.0.drift.h": 15, "signal.0.decimals": 4})
    ev = p.samples_one_by_one(x)
    assert [(i, sev) for i, sev, _ in ev] == [(ref_i, 1)]
    assert p.logs == [(1, f"bearing_temp: drift target learned: {ref_target:.6f} from 50 samples".rstrip("0"))]
    m = re.match(r"bearing_temp drift up: CUSUM ([\d.]+) > h 15 \(target ([\d.]+), k 0.5, value ([\d.]+)\)", ev[0][2])
    assert m, ev[0][2]
    assert float(m[1]) == pytest.approx(ref_s, abs=1e-4) and float(m[2]) == pytest.approx(ref_target, abs=1e-4)
    f = p.event_features[0]
    assert f["bearing_temp.drift.observed"] == pytest.approx(ref_s, rel=1e-9)
    assert f["bearing_temp.drift.limit"] == 15

    # Fixed target; direction: a downward drift does not raise an up-only rule.
    down = 20 - np.linspace(0, 3, 150)
    ref_i, _, _ = cusum_reference(down, 20, 0.5, 15)
    both = Proc(process_wasm, {"signal.0.drift.target": 20, "signal.0.drift.k": 0.5, "signal.0.drift.h": 15})
    assert [(i, m.split(":")[0]) for i, _, m in both.samples_one_by_one(down)] == [(ref_i, "ch0 drift down")]
    up = Proc(process_wasm, {"signal.0.drift.target": 20, "signal.0.drift.k": 0.5, "signal.0.drift.h": 15,
                             "signal.0.drift.direction": "up"})
    assert up.samples_one_by_one(down) == []


def test_ewma_drift(process_wasm):
    lam, limit, target = 0.1, 0.5, 10.0
    x = np.r_[np.full(20, 10.0), np.full(40, 11.0), np.full(60, 10.0)]
    z, first = target, None
    for i, v in enumerate(x):
        z = lam * v + (1 - lam) * z
        if first is None and z - target > limit:
            first = i
    p = Proc(process_wasm, {"signal.0.name": "ph", "signal.0.drift.target": target, "signal.0.drift.ewma": lam,
                            "signal.0.drift.limit": limit})
    ev = p.samples_one_by_one(x)
    assert ev[0][0] == first and ev[0][2].startswith("ph drift up: EWMA deviation 0.5")
    assert ev[1][1] == 0 and "ph back to normal (drift cleared after 5 samples)" in ev[1][2]
    assert len(ev) == 2


def gps_params(**extra):
    return {"gps.fix": 0, "gps.lat": 1, "gps.lon": 2, "gps.fix_lost_samples": 3, "gps.max_speed_mps": 50, **extra}


def test_gps_loss_of_fix(process_wasm):
    p = Proc(process_wasm, gps_params())
    nan = math.nan
    q = [1, 1, 0, 0, 1, 0, nan, 0, 0, 1, 2, 1, 1, 1]     # NaN (no quality reported) is no fix
    lat = [45.0 if v == v and v >= 1 else nan for v in q]
    lon = [170.0 if v == v and v >= 1 else nan for v in q]
    ev = p.samples_one_by_one([q, lat, lon], fs=1)
    assert [(i, sev) for i, sev, _ in ev] == [(7, 1), (13, 0)]
    assert ev[0][2] == ("gps loss of fix: no fix (fix quality 0) for 3 samples >= fix_lost_samples 3 "
                        "(last 8 fix qualities: 1 1 0 0 1 0 nan 0)")
    assert ev[1][2].startswith("gps back to normal (loss of fix cleared after 5 samples): fix quality 1")
    f = p.event_features[0]
    assert f["gps.fix_lost.observed"] == 3 and f["gps.fix_lost.limit"] == 3
    assert math.isnan(f["gps.fix_lost.history.6"])


def test_gps_position_jump_and_distance(process_wasm):
    # Distances: the module's (float32 coordinates, equirectangular) against haversine in float64.
    f32 = lambda v: float(np.float32(v))
    for lat0, lon0, lat1, lon1 in [(45.87759, 170.50012, 45.92256, 170.50012),      # 5 km north
                                   (-37.78478, 175.31489, -37.78478, 175.37189),    # 5 km east
                                   (64.1, -21.9, 64.19, -21.75), (0.0, 179.9995, 0.0, -179.9995)]:
        p = Proc(process_wasm, gps_params(**{"gps.max_speed_mps": 1}))
        p.samples_one_by_one([[1, 1], [lat0, lat1], [lon0, lon1]], fs=1)
        d = p.event_features[0]["gps.jump.value"]
        assert d == pytest.approx(haversine(f32(lat0), f32(lon0), f32(lat1), f32(lon1)), rel=1e-4)
    assert d < 120     # across the antimeridian: 111 m, not 40000 km

    p = Proc(process_wasm, gps_params())
    step = 2.0 ** -13                          # degrees, exact in float32: 13.6 m
    lat = 45.0 + np.arange(12) * step          # 13.6 m/s north
    lat[6:] += 0.045                           # 5 km further from sample 6 on
    q = np.ones(12)
    q[9] = 0                                   # one sample without a fix
    lon = np.full(12, 170.0)
    ev = p.samples_one_by_one([q, lat, lon], fs=1)
    assert [(i, sev) for i, sev, _ in ev] == [(6, 1)]          # 5 passes clear it; 4 came (7, 8, 10, 11)
    m = re.fullmatch(r"gps position jump: ([\d.]+) m in 1 s = ([\d.]+) m/s > max_speed_mps 50 "
                     r"\(from ([\d.]+),170 to ([\d.]+),170\) \(last 6 speeds m/s: 13.6 13.6 13.6 13.6 13.6 ([\d.]+)\)",
                     ev[0][2])
    assert m, ev[0][2]
    assert float(m[1]) == pytest.approx(haversine(f32(lat[5]), 170, f32(lat[6]), 170), abs=0.1)
    assert (float(m[3]), float(m[4])) == pytest.approx((f32(lat[5]), f32(lat[6])), abs=1e-6)
    f = p.event_features[0]
    assert f["gps.jump.observed"] == pytest.approx(float(m[2]), abs=0.1) and f["gps.jump.limit"] == 50
    assert (f["gps.jump.prev_lat"], f["gps.jump.lat"], f["gps.jump.dt"]) == pytest.approx((lat[5], lat[6], 1))
    ev = p.samples_one_by_one([[1], [lat[-1] + step], [170]], fs=1)
    assert [(sev, m[:50]) for _, sev, m in ev] == [(0, "gps back to normal (position jump cleared after 5 ")]
    # Samples without a fix between two fixes: the step spans their time (27.1 m in 2 s).
    p = Proc(process_wasm, gps_params(**{"gps.max_speed_mps": 5}))
    ev = p.samples_one_by_one([[1, 0, 1], [45.0, math.nan, 45.0 + 2 * step], [170, math.nan, 170]], fs=1)
    assert [i for i, _, _ in ev] == [2] and "jump: 27.1 m in 2 s = 13.6 m/s > max_speed_mps 5 " in ev[0][2]
    assert p.event_features[0]["gps.jump.dt"] == 2


# ================================================================== windows

def process_series() -> np.ndarray:
    """Two channels with events of every kind, sample by sample."""
    rng = np.random.default_rng(1)
    x = np.r_[50 + 0.5 * np.sin(np.arange(40)), np.linspace(50, 5, 20), 5 + np.arange(10) * 0.1,
              np.linspace(6, 50, 20), [20, 50], 50 + 0.5 * np.sin(np.arange(20)), np.full(40, 50.0),
              [np.nan] * 5, 50 + 0.3 * np.arange(60), np.full(30, 60.0)]
    y = np.round(rng.normal(0, 1, len(x)).cumsum() * 0.3, 1)
    y[100:120] = 3.0
    return np.vstack([x, y])


SERIES_PARAMS = {"signal.0.name": "a", "signal.0.min": 10, "signal.0.max": 90, "signal.0.rate_max": 100,
                 "signal.0.stuck_samples": 30, "signal.0.drift.learn": 20, "signal.0.drift.k": 1,
                 "signal.0.drift.h": 100, "signal.0.drift.direction": "up", "signal.0.missing_max": 3,
                 "signal.1.name": "b", "signal.1.stuck_samples": 7, "signal.1.stuck_tolerance": 0.5}


@pytest.mark.parametrize("size,hop,clock", [(16, 1, True), (16, 1, False), (32, 5, True), (32, 5, False),
                                            (16, 4, False), (20, 20, True), (20, 20, False), (64, 16, True),
                                            (16, 15, False)])
def test_overlapping_windows_see_each_sample_once(process_wasm, size, hop, clock):
    """Whatever the window size and hop, and with or without a usable clock, the module judges
    each sample exactly once: the events are those of the samples one by one."""
    x = process_series()
    ref = Proc(process_wasm, SERIES_PARAMS)
    ref.samples_one_by_one(x, fs=20)
    p = feed_windows(process_wasm, SERIES_PARAMS, x, 20, size, hop, clock)
    seen = size + (x.shape[1] - size) // hop * hop          # samples the windows covered
    ref_cut = Proc(process_wasm, SERIES_PARAMS)
    ref_cut.samples_one_by_one(x[:, :seen], fs=20)
    assert len(ref.events) >= 30 and len(ref_cut.events) >= 30
    assert p.events == ref_cut.events


def test_a_gap_restarts_the_runs(process_wasm):
    params = {"signal.0.name": "v", "signal.0.stuck_samples": 20, "signal.0.rate_max": 1}
    flat = np.full((1, 16), 7.0)
    fs = 10.0

    def windows(plan):
        """plan: (seq, start sample, dropped) per window of 16 back-to-back samples."""
        p = Proc(process_wasm, params)
        for seq, start, dropped in plan:
            assert p.window(flat, fs, seq, round(start * 1e9 / fs), dropped) == 0
        return p

    assert len(windows([(0, 0, 0), (1, 16, 0)]).events) == 1                    # 32 flat samples: stuck
    p = windows([(0, 0, 0), (2, 32, 1)])                                          # a window dropped
    assert p.events == [] and p.features["gap"] == 1
    assert windows([(0, 0, 0), (1, 40, 0)]).events == []                          # the clock jumped 40 samples
    p = windows([(0, 0, 0), (2, 32, 1), (3, 48, 0)])
    assert len(p.events) == 1 and p.features["gap"] == 0 and p.features["new_samples"] == 16
    # The clock says the windows overlap by 8 samples, the samples say they do not (the windower
    # restarted after a source gap): a gap, so no rate of change across it either.
    p = Proc(process_wasm, params)
    assert p.window(np.full((1, 16), 1.0), fs, 0, 0) == 0
    assert p.window(np.full((1, 16), 9.0), fs, 1, round(8 * 1e9 / fs)) == 0
    assert p.events == [] and p.features["gap"] == 1 and p.features["new_samples"] == 16
    # Without the gap the same step is a rate-of-change event.
    p = Proc(process_wasm, params)
    p.window(np.full((1, 16), 1.0), fs, 0, 0)
    p.window(np.full((1, 16), 9.0), fs, 1, round(16 * 1e9 / fs))
    assert [m.split(":")[0] for _, _, m in p.events] == ["v rate of change",
                                                         "v back to normal (rate of change cleared after 5 samples)"]


def test_event_storm_is_capped_per_window_and_deferred(process_wasm):
    params = {f"signal.{i}.max": 1 for i in range(20)}
    p = Proc(process_wasm, params)
    x = np.zeros((20, 16))
    x[:, 3:] = 5                                  # all 20 signals out of range from the same sample on
    assert p.window(x, 10, 0, 0) == 0
    assert len(p.events) == 16 and p.logs == [(2, "16 events in one window: 4 rule transitions wait for the next "
                                                  "samples")]
    x[:] = 5                                      # still out of range: the 4 others come with the next window
    assert p.window(x, 10, 1, round(16e9 / 10)) == 0
    assert len(p.events) == 20 and len({m for _, _, m in p.events}) == 20
    assert p.window(x, 10, 2, round(32e9 / 10)) == 0 and len(p.events) == 20     # no storm


def test_windows_without_the_configured_channels_are_refused(process_wasm):
    p = Proc(process_wasm, {"signal.5.max": 1})
    assert p.window(np.zeros((2, 16)), 10, 0, 0) == -3
    assert p.window(np.zeros((2, 16)), 10, 1, 0) == -3
    assert p.logs == [(3, "window has 2 channels, the params use channel 5 (indices count from 0); windows refused")]
    assert p.window(np.zeros((6, 16)), 10, 2, 0) == 0


def test_example_config_is_valid(process_wasm, tmp_path):
    from appliance.config.schema import load_config_document
    from appliance.runtime.modcheck import check_modules
    text = (REPO / "configs" / "process-example.yaml").read_text()
    assert "../modules/build/process.wasm" in text
    path = tmp_path / "example.yaml"
    path.write_text(text.replace("../modules/build/process.wasm", str(process_wasm))
                    .replace("../var/process-example", str(tmp_path / "var")))
    doc, cfg = load_config_document(path)
    assert check_modules(doc, cfg) == []
    assert {m.source for m in cfg.modules.values()} == {"line_plc", "gps"}
    # A params mistake is reported at the module's params line, in the module's words.
    doc_yaml = yaml.safe_load(path.read_text())
    doc_yaml["modules"]["plc_rules"]["params"]["signal.0"]["min"] = 500
    path.write_text(yaml.safe_dump(doc_yaml, sort_keys=False))
    doc, cfg = load_config_document(path)
    issues = check_modules(doc, cfg)
    assert len(issues) == 1 and "min 500 must be less than max 90" in issues[0].message


# ================================================================== Modbus RTU through the supervisor

def tri(t: float, period: float = 0.23) -> float:
    """A triangle wave in [-1, 1]: a live value that never holds still."""
    return 4 * abs((t / period) % 1.0 - 0.5) - 1


def test_modbus_register_driven_through_every_rule(process_wasm, tmp_path):
    """oil_temp (slave 1, holding register 0, int16 x 0.1) driven by the test; flow on slave 2.
    The source polls every 50 ms (20 Hz); windows of 16 with hop 1."""
    normal = lambda t: 500 + 5 * tri(t)                 # 50.0 +- 0.5
    peer = ModbusPeer({1: {"h": {0: 500}}, 2: {"h": {0: 120}}}, baudrate=BAUD)
    oil = RegisterDriver(peer, 1, 0, normal)
    flow = RegisterDriver(peer, 2, 0, lambda t: 120 + 3 * tri(t, 0.31))
    cfg = write_config(
        tmp_path,
        {"plc": {"type": "modbus_rtu", "device": peer.path, "baudrate": BAUD, "poll_s": 0.05, "timeout_s": 0.03,
                 "points": [{"name": "oil_temp", "slave": 1, "address": 0, "data_type": "int16", "scale": 0.1},
                            {"name": "flow", "slave": 2, "address": 0, "scale": 0.1}]}},
        {"proc": {"wasm": str(process_wasm), "source": "plc", "window": {"size": 16, "hop": 1}, "queue": 64,
                  "params": {"signal.0": {"name": "oil_temp", "min": 10, "max": 90, "rate_max": 100,
                                          "stuck_samples": 30,
                                          "drift": {"learn": 20, "k": 1, "h": 100, "direction": "up"}},
                             "signal.1": {"name": "flow", "missing_max": 10}}}})
    from appliance.core.supervisor import Supervisor
    sup = Supervisor(cfg)

    def seen(text: str) -> bool:
        return any(text in e["message"] for e in sup.spool.tail(100))

    sup.start()
    try:
        wait_for(lambda: sup.modules["proc"].processed >= 25, 15, "the drift target to be learned")
        # Out of range: ramp down at 30 units/s (well under rate_max), hold near 5, ramp back.
        oil.set_profile(lambda t: max(50, 500 - 300 * t) + 5 * tri(t))
        wait_for(lambda: seen("oil_temp out of range"), 10, "out of range")
        oil.set_profile(lambda t: min(500, 50 + 300 * t) + 5 * tri(t))
        wait_for(lambda: seen("oil_temp back to normal (out of range"), 10, "back in range")
        wait_for(lambda: abs(oil.value() - 500) <= 5, 5, "the ramp back to 50")
        time.sleep(0.3)
        # A spike: 50 -> 20 -> 50 (inside the range, 600 units/s).
        oil.set_profile(lambda t: 200 if t < 0.15 else normal(t))
        wait_for(lambda: seen("oil_temp back to normal (rate of change"), 10, "the spike and its end")
        # Held constant: stuck after 30 samples (1.5 s).
        oil.set_profile(lambda t: 500)
        wait_for(lambda: seen("oil_temp stuck"), 10, "stuck")
        # A slow drift up, 6 units/s: unstuck, then CUSUM (k 1, h 100) raises near 59.
        oil.set_profile(lambda t: 500 + 60 * t)
        wait_for(lambda: seen("oil_temp drift up"), 10, "drift")
        base = oil.value()
        oil.set_profile(lambda t: base + 5 * tri(t))
        # Slave 2 stops answering: NaN samples; more than 10 in a row is "no data".
        flow.silence()
        wait_for(lambda: seen("flow no data"), 10, "no data")
        flow.answer()
        wait_for(lambda: seen("flow back to normal"), 10, "flow back")
        time.sleep(0.3)
        timeouts = sup.sources["plc"].timeouts
    finally:
        sup.stop()
        oil.close()
        flow.close()
        peer.close()

    events = Spool(cfg.gateway.data_dir / "spool.db", 1 << 20).tail(100)
    got = [(e["severity"], re.match(r"^(\S+ [^:(]+)", e["message"])[1].strip()) for e in events]
    assert got == [("alarm", "oil_temp out of range"), ("info", "oil_temp back to normal"),
                   ("warning", "oil_temp rate of change"), ("info", "oil_temp back to normal"),
                   ("warning", "oil_temp stuck"), ("info", "oil_temp back to normal"),
                   ("warning", "oil_temp drift up"),
                   ("warning", "flow no data"), ("info", "flow back to normal")], [e["message"] for e in events]
    assert timeouts >= 11                                    # the silent slave really timed out
    msgs = [e["message"] for e in events]
    assert all(e["module"] == "proc" and e["source"] == "plc" for e in events)
    import jsonschema
    schema = json.loads((REPO / "docs" / "event.schema.json").read_text())
    for e in events:
        jsonschema.Draft202012Validator(schema).validate(e)

    # Each event names signal, rule, value, limit and the last 8 samples; features carry them.
    # A poll that timed out on a busy machine is a sample without a value: "nan" in the history.
    m = re.fullmatch(r"oil_temp out of range: ([\d.]+) < min 10 \(last 8:((?: (?:[\d.]+|nan)){8})\)", msgs[0])
    assert m and float(m[1]) < 10, msgs[0]
    history = [float(v) for v in m[2].split()]
    assert history[-1] == float(m[1]) and history[0] > history[-1]      # the ramp down, as evidence
    f = events[0]["features"]
    assert f["oil_temp.range.value"] == pytest.approx(float(m[1]), abs=0.01) and f["oil_temp.range.limit"] == 10
    for i, value in enumerate(history):
        feature = f[f"oil_temp.range.history.{i}"]
        assert (feature is None or math.isnan(feature)) if math.isnan(value) else feature == pytest.approx(value, abs=0.01)
    assert events[0]["window"]["channels"] == ["oil_temp", "flow"] and events[0]["window"]["sample_rate"] == 20

    assert "(out of range cleared after 5 samples)" in msgs[1] and "within [10, 90]" in msgs[1]
    m = re.search(r"rate of change: ([\d.]+)/s > rate_max 100/s \(([\d.]+) to 20 in 0.05 s\)", msgs[2])
    assert m and float(m[1]) > 500, msgs[2]
    assert events[2]["features"]["oil_temp.rate.observed"] > 500
    assert "oil_temp stuck: 30 samples within 0 of 50 >= stuck_samples 30 (last 8: 50 50 50 50 50 50 50 50)" == msgs[4]
    assert "(stuck cleared after 5 samples)" in msgs[5]
    m = re.search(r"drift up: CUSUM ([\d.]+) > h 100 \(target ([\d.]+), k 1, value ([\d.]+)\)", msgs[6])
    assert m and float(m[1]) > 100 and 49.5 < float(m[2]) < 50.5 and 52 < float(m[3]) < 70, msgs[6]
    assert events[6]["features"]["oil_temp.drift.observed"] > 100
    assert re.match(r"flow no data: 11 samples in a row without a value > missing_max 10 \(last 8:( nan){8}\)", msgs[7])
    assert events[7]["features"]["flow.missing.history.7"] is None          # NaN: null in the event's JSON


# ================================================================== NMEA logs through the supervisor

NMEA_PARAMS = {"gps": {"fix": 0, "lat": 2, "lon": 3, "fix_lost_samples": 5, "max_speed_mps": 50},
               "signal.1": {"name": "satellites", "min": 4},
               "signal.2": {"name": "latitude", "missing_max": 10},
               "signal.5": {"name": "speed", "max": 60}}
FIVE_KM_MIN = 5000 / (EARTH_RADIUS_M * math.pi / 180) * 60      # 5 km of latitude, in minutes of arc


def altered_log(path: Path, lost: range, jump_from: int) -> list[bytes]:
    """The log's epochs with the fix lost (quality 0, RMC status V, no position) during `lost`
    and every position from epoch `jump_from` on moved 5 km north; checksums recomputed."""
    out = []
    for i, epoch in enumerate(split_epochs(path.read_text(errors="replace"))):
        for line in epoch:
            text = line.decode().strip()
            f = text[1:text.index("*")].split(",")
            kind = f[0][2:]
            if kind == "GGA" and i in lost:
                f[2:6], f[6] = ["", "", "", ""], "0"
            elif kind == "RMC" and i in lost:
                f[2], f[3:9] = "V", ["", "", "", "", "", ""]
            elif kind in ("GGA", "RMC") and i >= jump_from:
                j = 2 if kind == "GGA" else 3
                minutes = float(f[j][:2]) * 60 + float(f[j][2:]) + (FIVE_KM_MIN if f[j + 1] == "N" else -FIVE_KM_MIN)
                f[j] = f"{int(minutes // 60):02d}{minutes % 60:07.4f}"
            out.append((make_sentence(",".join(f)) + "\r\n").encode())
    return out


def test_nmea_logs_through_the_supervisor(process_wasm, tmp_path):
    logs = sorted((SHARED_DATA / "serial" / "nmea").glob("*.log"))
    require(bool(logs), f"NMEA logs in {SHARED_DATA / 'serial' / 'nmea'} (see ../shared/data/README.md)")
    mt3339 = next((p for p in logs if p.name == "mt3339.log"), logs[0])
    feeds = {f"log{i}": NmeaWriter.device_lines(p) for i, p in enumerate(logs)}
    feeds["altered"] = altered_log(mt3339, lost=range(8, 15), jump_from=22)
    epochs = {k: len(split_epochs(b"".join(v).decode())) for k, v in feeds.items()}
    assert epochs["altered"] >= 29       # room for the jump to clear after epoch 22
    writers = {k: NmeaWriter(BAUD) for k in feeds}
    from appliance.core.supervisor import Supervisor
    cfg = write_config(
        tmp_path, {k: {"type": "nmea", "device": w.path, "baudrate": BAUD, "sample_rate": 1} for k, w in writers.items()},
        {f"rules_{k}": {"wasm": str(process_wasm), "source": k, "window": {"size": 16, "hop": 1}, "queue": 64,
                        "params": NMEA_PARAMS} for k in feeds})
    sup = Supervisor(cfg)
    sup.start()
    try:
        for k in feeds:
            wait_for(lambda k=k: sup.sources[k].health[0] is Health.OK, 5, f"source {k} to open")
        for k, w in writers.items():      # replayed at 115200 baud: far faster than the 1 Hz fixes
            w.start(feeds[k])
        wait_for(lambda: all(sup.sources[k].fixes >= epochs[k] for k in feeds), 20, "every fix")
        for host in sup.modules.values():
            assert host.wait_idle(5)
        processed = {k: sup.modules[f"rules_{k}"].processed for k in feeds}
    finally:
        sup.stop()
        for w in writers.values():
            w.close()
    assert processed == {k: epochs[k] - 15 for k in feeds}     # windows of 16, hop 1: every fix judged
    events = Spool(cfg.gateway.data_dir / "spool.db", 1 << 20).tail(100)
    assert [e["source"] for e in events if e["source"] != "altered"] == []       # the real logs: quiet
    got = [(e["severity"], e["message"]) for e in events]
    assert [(sev, msg.split(":")[0]) for sev, msg in got] == [
        ("warning", "gps loss of fix"), ("info", "gps back to normal (loss of fix cleared after 5 samples)"),
        ("warning", "gps position jump"), ("info", "gps back to normal (position jump cleared after 5 samples)")]
    assert got[0][1] == ("gps loss of fix: no fix (fix quality 0) for 5 samples >= fix_lost_samples 5 "
                         "(last 8 fix qualities: 2 2 2 0 0 0 0 0)")
    m = re.match(r"gps position jump: ([\d.]+) m in 1 s = ([\d.]+) m/s > max_speed_mps 50 "
                 r"\(from ([\d.]+),(-[\d.]+) to ([\d.]+),(-[\d.]+)\)", got[2][1])
    assert m, got[2][1]
    assert float(m[1]) == pytest.approx(5000, abs=3)             # 5 km, give or take a float32 step
    assert float(m[5]) - float(m[3]) == pytest.approx(0.04497, abs=2e-5)
    f = events[2]["features"]
    assert f["gps.jump.value"] == pytest.approx(5000, abs=3) and f["gps.jump.limit"] == 50
    assert f["gps.jump.history.7"] == pytest.approx(f["gps.jump.observed"], rel=1e-6)
