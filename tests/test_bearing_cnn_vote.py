"""The bearing module's second opinion (diagnosis.second_opinion=bearing_cnn): the embedded
network is the committed model and computes what onnxruntime computes; it names the part where
the envelope signature names none; it never overrules a named part into another one; and it stays
out where it cannot look (a rate that is not 12 kHz or a multiple).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from test_bearing_module import CWRU_PARAMS, FS, WINDOW, Bearing, cwru, healthy_12k, windows, wasm  # noqa: F401
from test_bearing_diagnosis import PARAMS as SYNTHETIC_PARAMS, fault_signal

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "modules" / "models" / "bearing_cnn" / "bearing_cnn.onnx"
HEADER = REPO / "modules" / "src" / "bearing" / "bearing_cnn_net.h"
VOTE = {**CWRU_PARAMS, "diagnosis.second_opinion": "bearing_cnn"}
CLASSES = ("normal", "inner", "outer", "ball")


def test_embedded_network_is_the_committed_model():
    from appliance_tools.nn.embed import embed_source
    assert HEADER.read_text() == embed_source(MODEL), \
        "modules/src/bearing/bearing_cnn_net.h is stale: python -m appliance_tools.nn.embed " \
        "modules/models/bearing_cnn/bearing_cnn.onnx -o modules/src/bearing/bearing_cnn_net.h"


def replay(wasm_bytes: bytes, params: dict, fault: list[np.ndarray], fs: float = FS) -> tuple[Bearing, list]:
    """Healthy baseline (12 windows of the healthy recording at 12 kHz), then the fault windows;
    the features of every event window."""
    m = Bearing(wasm_bytes, params, True)
    at_events = []
    for seq, w in enumerate(windows(healthy_12k())[:params["baseline.windows"]] + fault):
        before = len(m.events)
        assert m.process(np.atleast_2d(w), fs if seq >= params["baseline.windows"] else FS, seq) == 0, m.logs
        if len(m.events) > before:
            at_events.append((dict(m.features), m.events[-1], np.atleast_2d(w)[0].copy()))
    return m, at_events


def test_cnn_probabilities_equal_onnxruntime(wasm):
    import onnxruntime
    _, at = replay(wasm, VOTE, windows(cwru("ball_007_1hp_12k.mat"))[:6])
    assert at, "no event"
    features, _, w = at[0]
    assert features["cnn.slices"] == WINDOW // 1024 == 4
    sess = onnxruntime.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    slices = w.astype(np.float32).reshape(4, 1, 1, 1024)
    want = np.mean([sess.run(None, {"window": s})[0][0] for s in slices], axis=0)
    got = np.array([features[f"cnn.{c}"] for c in CLASSES])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["ball_007_1hp_12k.mat", "ball_007_2hp_12k.mat", "ball_007_3hp_12k.mat"])
def test_cnn_names_only_the_signatures_top_candidate(wasm, name):
    """The 1-3 hp ball recordings (not in its training data): the CNN names a part only when it
    agrees with the envelope signature's top candidate; otherwise its vote is listed as a
    candidate in the message (review 1, finding 3)."""
    _, at = replay(wasm, VOTE, windows(cwru(name))[:8])
    assert at
    features, event, _ = at[0]
    conf = {k: features[f"conf.{k}"] for k in ("outer", "inner", "ball", "cage")}
    top = max(conf, key=conf.get)
    if features["diagnosis.method"] == 2:
        assert features["diagnosis"] == {"outer": 1, "inner": 2, "ball": 3, "cage": 4}[top], event[2]
        assert "(named by bearing_cnn, p " in event[2]
    else:
        assert "bearing_cnn" in event[2], event[2]


def test_cnn_at_48k_looks_at_the_window_decimated_in_the_spectrum(wasm):
    """A 48 kHz window of 16384 frames: the CNN sees it at 12 kHz (its spectrum up to 6 kHz,
    inverse transformed with 4096 points), four slices."""
    x = cwru("ball_007_0hp_48k.mat")
    fault = [x[i:i + 4 * WINDOW] for i in range(0, 6 * 4 * WINDOW, 2 * WINDOW)]
    params = dict(VOTE)
    m = Bearing(wasm, params, True)
    # the baseline at 48 kHz: the healthy recording as it is
    normal = cwru("normal_0hp_48k.mat")
    seq = 0
    for i in range(0, 12 * 2 * WINDOW, 2 * WINDOW):
        assert m.process(normal[i:i + 4 * WINDOW][None], 48000.0, seq) == 0
        seq += 1
    for w in fault:
        before = len(m.events)
        assert m.process(w[None], 48000.0, seq) == 0
        seq += 1
        if len(m.events) > before:
            break
    assert m.events and m.features["cnn.slices"] == 4
    assert m.features["cnn.ball"] > 0.9, m.features


def test_the_vote_never_swaps_a_named_part(wasm):
    """A synthetic inner-race fault the signature names: the CNN (which knows the CWRU rig, not
    this signal: it says "ball" with p 0.94-0.97 here) neither un-names nor swaps the signature's
    part; its dissent is listed as a candidate in the message."""
    fs, n = 12000.0, 4096
    params = {**SYNTHETIC_PARAMS, "diagnosis.second_opinion": "bearing_cnn"}
    m = Bearing(wasm, params, True)
    healthy = fault_signal("healthy", fs, 11 * n / fs, seed=1)
    faulty = fault_signal("inner", fs, 13 * n / fs, seed=2)
    seq = 0
    checked = 0
    for x in (healthy, faulty):
        for i in range(0, len(x) - n + 1, n):
            before = len(m.events)
            assert m.process(x[i:i + n][None], fs, seq) == 0
            seq += 1
            if len(m.events) > before and m.events[-1][0] > 0:
                f, msg = m.features, m.events[-1][2]
                assert f["cnn.slices"] == 4
                assert f["diagnosis"] == 2 and f["diagnosis.method"] == 1, msg
                checked += 1
    assert checked
    assert "bearing_cnn's candidate: ball p" in m.events[0][2], m.events[0][2]   # the dissent, listed


def test_no_vote_where_the_cnn_cannot_look(wasm):
    """At 20 kHz (not 12 kHz or a multiple) the CNN has no input: no slices, the signature alone."""
    fs, n = 20000.0, 8192
    params = {**SYNTHETIC_PARAMS, "diagnosis.second_opinion": "bearing_cnn"}
    m = Bearing(wasm, params, True)
    healthy = fault_signal("healthy", fs, 11 * n / fs, seed=1)
    faulty = fault_signal("outer", fs, 6 * n / fs, seed=2)
    seq = 0
    for x in (healthy, faulty):
        for i in range(0, len(x) - n + 1, n):
            assert m.process(x[i:i + n][None], fs, seq) == 0
            seq += 1
    assert m.events and m.features["cnn.slices"] == 0
    assert m.features["diagnosis"] == 1 and m.features["diagnosis.method"] == 1


def test_second_opinion_off_reports_no_cnn_features(wasm):
    _, at = replay(wasm, CWRU_PARAMS, windows(cwru("ball_007_1hp_12k.mat"))[:6])
    assert at and not any(k.startswith("cnn.") for k in at[0][0])
