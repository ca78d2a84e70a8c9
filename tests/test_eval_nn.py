"""The trained models through the real pipeline on their held-out data (appliance_tools.evaluation.nn):
the bearing classifier on the held-out part of each CWRU recording (replay -> worker -> wasm3),
the people counter on vtest.avi with configs/nn-camera.yaml (camera -> worker -> wasm3)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from appliance_tools.evaluation import nn as evaluation_nn
from conftest import REPO, shared_file

MODELS = REPO / "modules" / "models"


def _report(model: str) -> dict:
    return json.loads((MODELS / model / "report.json").read_text())


@pytest.fixture(scope="module")
def modules(tmp_path_factory) -> dict[str, Path]:
    return evaluation_nn.build(tmp_path_factory.mktemp("nn-eval"))


@pytest.fixture(scope="module")
def cwru() -> Path:
    return shared_file("bearing", "cwru", "normal_0hp_48k.mat").parent


@pytest.fixture(scope="module")
def bearing_results(cwru, modules) -> list[evaluation_nn.BearingResult]:
    return evaluation_nn.evaluate_bearing(cwru, modules={"float": modules["bearing_cnn"],
                                                         "int8": modules["bearing_cnn_int8"]})


def test_nn_bearing_on_held_out_recordings(bearing_results):
    report = _report("bearing_cnn")
    assert {(r.recording, r.kind) for r in bearing_results} == {
        (name, kind) for name in report["split"]["recordings"] for kind in ("float", "int8")}
    for r in bearing_results:
        where = f"{r.recording} ({r.kind})"
        # Each window as onnxruntime classified the same window at training time.
        predicted = report["held_out"][r.kind]["per_file"][r.recording]["predicted"]
        assert {c: r.classes[c] for c in predicted} == predicted, where
        assert r.accuracy >= 0.9, f"{where}: {r.classes}"
        if r.label == "normal":
            assert not r.alarms and r.flagged <= 0.1, f"{where}: healthy but {r.classes}, {r.alarms}"
        else:
            assert r.alarms, f"{where}: a {r.label} fault and no event"
            assert r.diagnosis == r.label, f"{where}: events say {r.diagnosis}"
            seq, severity, _, message = r.alarms[0]
            assert severity == 2 and f"class '{r.label}'" in message, message
            # Three fault windows in a row raise it: the first event comes with the third window.
            assert seq == 2, f"{where}: first event at window {seq}"
            assert len(r.alarms) == 1, f"{where}: one episode, one event: {r.alarms}"
        assert r.verdict == "ok"
        assert r.host_windows == 0       # host_nn off: every window by the module's own wasm code


def test_nn_bearing_host_twin_through_the_worker(cwru, modules):
    """host_nn on: the worker's ap.nn_run computes every window, and the tally is the same."""
    results = evaluation_nn.evaluate_bearing(cwru, host_nn=True, only=["outer_race_007_at6_0hp_12k.mat"],
                                             modules={"int8": modules["bearing_cnn_int8"]})
    (r,) = results
    assert r.host_windows == r.windows == 35
    assert r.classes["outer"] == 35 and r.verdict == "ok"


def test_nn_bearing_evaluation_can_fail(tmp_path, cwru):
    """The same checks on a module whose labels are swapped (inner <-> outer) say so."""
    from appliance_tools.nn import compile_model
    spec = evaluation_nn.SPECS["bearing_cnn"]
    options = spec.compile_options()
    options["labels"] = ["normal", "outer", "inner", "ball"]
    wasm = compile_model(spec.onnx, tmp_path / "swapped.wasm", native=False, **options).wasm
    results = evaluation_nn.evaluate_bearing(cwru, only=["inner_race_007_0hp_12k.mat", "normal_0hp_48k.mat"],
                                             modules={"float": wasm})
    verdicts = {r.recording: r.verdict for r in results}
    assert verdicts == {"inner_race_007_0hp_12k.mat": "WRONG DIAGNOSIS", "normal_0hp_48k.mat": "ok"}
    table = evaluation_nn.bearing_table(results)
    assert "WRONG" in table and "inner_race_007_0hp_12k" in table


def test_nn_bearing_table_beside_the_classical_module(bearing_results, cwru):
    from appliance_tools.evaluation import bearing as evaluation
    classical = evaluation.evaluate(cwru)
    table = evaluation_nn.bearing_table(bearing_results, classical)
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert set(rows) == {Path(n).stem for n in _report("bearing_cnn")["split"]["recordings"]}
    assert re.search(r"\|\s+58\s+100%\s+1 inner race\s+ok$", rows["inner_race_007_0hp_12k"]), \
        rows["inner_race_007_0hp_12k"]
    assert rows["normal_0hp_48k"].rstrip().endswith("ok")


def _score_rule(values: list[float], threshold: float, clear_threshold: float, consecutive: int,
                clear: int) -> list[tuple[int, str]]:
    """The compiled score rule, written out again: (frame, start|end) of each episode."""
    out, streak, calm, active = [], 0, 0, False
    for i, v in enumerate(values):
        if v > threshold:
            streak, calm = streak + 1, 0
            if not active and streak >= consecutive:
                active = True
                out.append((i, "start"))
        else:
            streak = 0
            calm = calm + 1 if v < clear_threshold else 0
            if active and calm >= clear:
                active = False
                out.append((i, "end"))
    return out


@pytest.fixture(scope="module")
def video() -> Path:
    return shared_file("video", "vtest.avi")


def test_nn_camera_through_the_pipeline(video, modules):
    from test_nn_models import ort_outputs, agree, output_lsb
    report = _report("people_cnn")
    results = evaluation_nn.evaluate_camera(video, modules={"float": modules["people_cnn"],
                                                            "int8": modules["people_cnn_int8"]})
    labels = evaluation_nn.camera_labels()
    assert len(labels) == report["split"]["frames"] == 795

    import sys
    sys.path.insert(0, str(MODELS))
    import nn_data
    frames = nn_data.read_frames(video)
    held = range(*report["split"]["held_out"])
    x = frames.astype(np.float32)[:, None] * np.float32(report["input"]["scale"])
    for kind, r in results.items():
        assert sorted(r.counts) == list(range(795)), f"{kind}: frames without a result"
        got = np.array([r.counts[i] for i in range(795)], np.float32)[:, None]
        onnx_path = MODELS / "people_cnn" / report["files"][kind]["file"]
        ok, worst = agree(kind, got, ort_outputs(onnx_path, x), output_lsb(onnx_path) if kind == "int8" else 0.0)
        assert ok, f"{kind}: pipeline vs onnxruntime: {worst}"
        m = r.metrics(labels, held)
        base = report["held_out_baseline_mean_count"]["mae"]
        # The task: counting on frames it never saw, clearly better than a constant guess.
        assert m["mae"] < 1.1 and m["mae"] < 0.6 * base, f"{kind}: held-out {m} (constant guess MAE {base:.3f})"
        assert m["within_1"] >= 0.7, f"{kind}: held-out {m}"
        # Events: exactly where the rule configured in configs/nn-camera.yaml puts them on these counts.
        (module,) = yaml.safe_load(evaluation_nn.CAMERA_CONFIG.read_text())["modules"].values()
        rule = {**evaluation_nn.PEOPLE_RULE, **module["params"]}
        want = _score_rule(got[:, 0].tolist(), rule["threshold"], rule["clear_threshold"], rule["consecutive"],
                           rule["clear"])
        have = [(seq, "start" if sev > 0 else "end") for seq, sev, _ in r.events]
        assert have == want, f"{kind}: events {have}, the rule says {want}"
        assert r.host_frames == 0
