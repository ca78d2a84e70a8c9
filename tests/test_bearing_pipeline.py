"""The bearing module in the appliance: evaluation on real data, host DSP through the worker,
and params the module refuses at validate time."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml

from appliance.config.schema import module_params_text, load_config
from appliance_tools.modbuild import build_module
from appliance.runtime.wire import HEADER, load_message, pack_header
from appliance.runtime.process import WorkerProcess

from conftest import REPO, shared_file

CWRU_CONFIG = REPO / "configs" / "cwru-eval.yaml"


@pytest.fixture(scope="module")
def bearing_wasm(tmp_path_factory):
    out = tmp_path_factory.mktemp("bearing") / "bearing.wasm"
    result = build_module(REPO / "modules" / "src" / "bearing", out)
    assert not result.problems, result.problems
    return out


def test_evaluation_on_cwru(bearing_wasm):
    from appliance_tools.evaluation import bearing as evaluation
    data = shared_file("bearing", "cwru", "normal_0hp_48k.mat").parent
    results = {r.name: r for r in evaluation.evaluate(data, wasm=bearing_wasm)}
    print("\n" + evaluation.table(list(results.values())))
    healthy = [r for r in results.values() if r.expected is None]
    assert len(healthy) == 2 and all(r.windows > 10 and not r.alarms for r in healthy)
    for name, r in results.items():
        if r.expected is not None:
            assert r.alarms, f"{name} not flagged"
            assert r.anomaly_rate > 0.9
        if r.expected in ("inner race", "outer race"):
            assert r.diagnosis == r.expected, (name, r.diagnosis)
            assert r.alarms[0]["severity"] == "critical"
            assert len(r.alarms) == 1   # one fault, one event story (no storm)


def cwru_windows(n_windows: int, size: int = 4096, name: str = "outer_race_007_at6_0hp_12k.mat") -> list[np.ndarray]:
    import scipy.io
    import scipy.signal
    data = scipy.io.loadmat(shared_file("bearing", "cwru", name))
    x = next(v for k, v in data.items() if k.endswith("_DE_time"))[:, 0]
    if name.endswith("_48k.mat"):   # to the 12 kHz of the fault recordings, as the replay decimates
        x = scipy.signal.decimate(x, 4, ftype="fir", zero_phase=True)
    x = x.astype(np.float32)
    return [x[i * size:(i + 1) * size][None] for i in range(n_windows)]


def test_host_dsp_and_wasm_fft_agree_through_the_worker(bearing_wasm):
    cfg = load_config(CWRU_CONFIG)
    module = cfg.modules["bearing"]
    params = {dsp: module_params_text(module.model_copy(update={"host_dsp": dsp})).replace(
        "baseline.windows=12", "baseline.windows=3") for dsp in (False, True)}
    assert "host.dsp=1" in params[True] and "host.dsp=0" in params[False]
    features = {}
    for dsp, text in params.items():
        worker = WorkerProcess("bearing", bearing_wasm.read_bytes(), HEADER.size + 4 * 4096,
                               load_message("bearing.wasm", text))
        try:
            # healthy windows for the baseline, then the outer-race fault: diagnosed windows
            for seq, w in enumerate(cwru_windows(3, name="normal_0hp_48k.mat") + cwru_windows(3)):
                header = pack_header(1, 4096, 12000.0, seq)
                reply = worker.process(header, w, 10.0)
                assert reply["rc"] == 0
        finally:
            worker.stop()
        features[dsp] = reply["f"]
    c, host = features[False], features[True]
    assert set(c) == set(host) and len(c) > 30
    for name in c:
        assert host[name] == pytest.approx(c[name], rel=1e-4, abs=1e-9), name
    assert c["diagnosis"] == host["diagnosis"] == 1   # outer race


@pytest.mark.parametrize("change, message", [
    # what only the module can judge (a relation between params): its own message, at params:
    ({"pitch_diameter": 0.3}, "module rejected its params: bearing.pitch_diameter must exceed bearing.ball_diameter"),
])
def test_impossible_geometry_is_refused_at_validate(tmp_path, bearing_wasm, change, message):
    doc = yaml.safe_load(CWRU_CONFIG.read_text())
    doc["modules"]["bearing"]["wasm"] = str(bearing_wasm)
    doc["modules"]["bearing"]["params"]["bearing"].update(change)
    for seg in doc["sources"]["drive_end"]["segments"]:
        seg["path"] = str((CWRU_CONFIG.parent / seg["path"]).resolve())
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    shared_file("bearing", "cwru", "normal_0hp_48k.mat")
    proc = subprocess.run([sys.executable, "-m", "appliance", "validate", str(path)], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2, proc.stdout
    line = next(i + 1 for i, text in enumerate(path.read_text().splitlines()) if text.strip() == "params:")
    assert f"{path}:{line}:5: modules.bearing.params: {message}" in proc.stderr, proc.stderr


def test_a_geometry_out_of_range_is_refused_at_its_line(tmp_path, bearing_wasm):
    """What the manifest says (bearing.balls >= 1) is checked before any worker, at the value."""
    doc = yaml.safe_load(CWRU_CONFIG.read_text())
    doc["modules"]["bearing"]["wasm"] = str(bearing_wasm)
    doc["modules"]["bearing"]["params"]["bearing"]["balls"] = 0
    for seg in doc["sources"]["drive_end"]["segments"]:
        seg["path"] = str((CWRU_CONFIG.parent / seg["path"]).resolve())
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    shared_file("bearing", "cwru", "normal_0hp_48k.mat")
    proc = subprocess.run([sys.executable, "-m", "appliance", "validate", str(path)], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    line = next(i + 1 for i, text in enumerate(path.read_text().splitlines()) if text.strip() == "balls: 0")
    assert proc.returncode == 2
    assert f"{path}:{line}:16: modules.bearing.params.bearing.balls: 0 is invalid: bearing.balls must be >= 1" \
        in proc.stderr, proc.stderr


def test_negative_speed_is_refused(tmp_path, bearing_wasm):
    cfg = load_config(CWRU_CONFIG)
    text = module_params_text(cfg.modules["bearing"]).replace("shaft.rpm_max=1850\nshaft.rpm_min=1700\n",
                                                              "shaft.rpm=-1797\n")
    from appliance.runtime.process import ModuleFault
    with pytest.raises(ModuleFault) as info:
        WorkerProcess("bearing", bearing_wasm.read_bytes(), 4096, load_message("bearing.wasm", text))
    assert info.value.kind == "params" and "rpm" in info.value.reason


def test_evaluation_exits_nonzero_on_a_wrong_part(bearing_wasm, capsys):
    """The same evaluation with a naming rule that names whatever is strongest (confidence 0.01, no
    margin): parts get named on the ball recordings that are not the ball, and the tool says so
    with its exit status."""
    from appliance_tools.evaluation import bearing as evaluation
    data = shared_file("bearing", "cwru", "normal_0hp_48k.mat").parent
    rc = evaluation.main(["--data", str(data), "--wasm", str(bearing_wasm), "--param", "diagnosis.min_confidence=0.01",
                          "--param", "diagnosis.margin=0", "--param", "diagnosis.second_opinion=none"])
    out = capsys.readouterr().out
    assert rc == 1 and "WRONG PART" in out and "named wrong 0" not in out, out


def test_evaluation_of_an_ims_style_run(bearing_wasm, tmp_path, capsys):
    """An IMS-style folder: tab-separated snapshots named by time, 20 kHz, the bearing in column 1;
    healthy snapshots, then an outer-race fault. The first snapshots teach the baseline; the run is
    flagged at the first faulty snapshot and the part named."""
    from appliance_tools.evaluation import bearing as evaluation
    from test_bearing_diagnosis import fault_signal
    fs, seconds = 20000.0, 0.5
    run = tmp_path / "1st_test"
    run.mkdir()
    for i in range(12):
        kind = "healthy" if i < 8 else "outer"
        bearing = fault_signal(kind, fs, seconds, seed=10 + i)
        other = 0.05 * np.random.default_rng(i).standard_normal(len(bearing))
        np.savetxt(run / f"2004.02.12.{10 + i:02d}.00.00", np.stack([other, bearing], axis=1), fmt="%.4f",
                   delimiter="\t")
    rc = evaluation.main(["--format", "ims", "--data", str(run), "--channels", "1", "--baseline-snapshots", "4",
                          "--expect", "outer race", "--wasm", str(bearing_wasm),
                          "--param", "shaft.rpm_max=1900", "--param", "diagnosis.second_opinion=none"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "first flagged at snapshot 2004.02.12.18.00.00" in out, out
    assert "outer race   signature" in out, out
