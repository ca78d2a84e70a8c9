"""Module params with a schema: each module's module.yaml declares its params, the build embeds
them in the .wasm (ap.manifest), the host checks a config against them before any worker starts,
and the module checks them again in ap_init (ap_params_check)."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
import yaml

from appliance.config import params as schema
from appliance.config.schema import ConfigError, load_config, module_params_text
from appliance.runtime.process import ModuleFault, WorkerProcess
from appliance.runtime.wire import HEADER, load_message, pack_header
from appliance_tools.modbuild import build_module, load_manifest
from conftest import REPO, require_tool

BEARING = {"bearing": {"balls": 9, "ball_diameter": 0.3126, "pitch_diameter": 1.537},
           "shaft": {"rpm": 1797}, "threshold": 6}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("params")
    return {name: build_module(REPO / "modules" / "src" / name, out / f"{name}.wasm").out
            for name in ("vibstats", "bearing", "process", "motion")}


def write(tmp_path, wasm, params, *, name="watch", window=True):
    doc = {"gateway": {"name": "gw", "data_dir": str(tmp_path / "var")}, "metrics": {"enabled": False},
           "sources": {"s": {"type": "sim_vibration", "sample_rate": 12800}},
           "modules": {name: {"wasm": str(wasm), "source": "s", "params": params}}}
    if window:
        doc["modules"][name]["window"] = {"size": 4096}
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def issues(path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(i) for i in info.value.issues]


def line_of(path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_every_shipped_module_carries_its_manifest(built):
    for name, wasm in built.items():
        manifest = schema.read_manifest(wasm)
        assert manifest is not None and manifest.name == name
        assert manifest == load_manifest(REPO / "modules" / "src" / name).params


def test_a_misspelt_param_is_refused_at_its_line_before_any_worker_starts(tmp_path, built, monkeypatch):
    def no_worker(*args, **kw):
        raise AssertionError("a worker was started")
    monkeypatch.setattr(WorkerProcess, "__init__", no_worker)
    path = write(tmp_path, built["bearing"], {**BEARING, "treshold": 9})
    from appliance.cli import main
    assert main(["validate", str(path)]) == 2     # the whole `appliance validate`, workers included
    (problem,) = issues(path)
    assert problem.startswith(f"{path}:{line_of(path, 'treshold')}:")
    assert problem.endswith("'treshold' is not a param of module bearing. Did you mean 'threshold'?")


def test_nested_keys_types_ranges_choices_and_required(tmp_path, built):
    path = write(tmp_path, built["bearing"], {"bearing": {"balls": 9.5, "pitch_diameter": 1.5, "ball_diamter": 0.3},
                                              "shaft": {"rpm": -3}, "iso": {"foundation": "concrete"},
                                              "baseline": {"windows": "many"}})
    found = issues(path)
    text = "\n".join(found)
    assert "'ball_diamter' is not a param of module bearing (bearing.ball_diamter). " \
           "Did you mean 'bearing.ball_diameter'?" in text
    assert "9.5 is invalid: bearing.balls is a whole number" in text
    assert "-3 is invalid: shaft.rpm must be > 0" in text
    assert "'concrete' is invalid: iso.foundation is one of rigid, flexible" in text
    assert "'many' is invalid: baseline.windows is a whole number" in text
    assert "required param 'bearing.ball_diameter' of module bearing is missing" in text
    lines = [int(p.split(":")[1]) for p in found]
    assert lines == sorted(lines)                  # one issue per problem, in file order
    assert found[0].split(":")[1] == str(line_of(path, "params:"))   # the missing one: at params


def test_patterns_for_indexed_and_named_params(tmp_path, built):
    ok = write(tmp_path, built["process"], {"signal.0": {"name": "oil", "max": 110, "severity": {"range": "critical"}},
                                            "gps": {"fix": 0}}, window=False)
    path = ok.parent / "ok.yaml"
    path.write_text(ok.read_text().replace("params:", "window: {size: 16, hop: 1}\n    params:", 1))
    load_config(path)
    bad = write(tmp_path, built["process"], {"signal.x": {"max": 1}, "signal.1": {"rate_mx": 2}})
    text = "\n".join(issues(bad))
    assert "'max' is not a param of module process (signal.x.max)" in text
    assert "Did you mean 'signal.1.rate_max'?" in text
    zones = write(tmp_path, built["motion"], {"zone": {"dock.a": [[0, 0], [10, 0], [10, 10]]},
                                              "mask": {"sky": [[0, 0], [1, 1]]}}, window=False)
    assert any("is invalid: mask.sky is a polygon, at least 3 points" in p for p in issues(zones))


def test_a_module_without_a_manifest_still_loads_with_a_warning(tmp_path, caplog):
    bare = build_module(REPO / "modules" / "src" / "vibstats" / "vibstats.c", tmp_path / "bare.wasm").out
    assert schema.read_manifest(bare) is None
    cfg = load_config(write(tmp_path, bare, {"treshold": 9}))   # unchecked, as before manifests
    assert cfg.modules["watch"].params == {"treshold": 9}
    assert "has no params manifest" in caplog.text


def test_the_module_refuses_an_unknown_key_itself(built):
    """Defence in depth: a host that skipped the check (an older one, a direct load) still
    meets the module's own ap_params_check, generated from the same manifest."""
    with pytest.raises(ModuleFault) as info:
        WorkerProcess("t", built["vibstats"].read_bytes(), 4096, load_message("vibstats.wasm", "treshold=9\n"))
    assert info.value.kind == "params"
    assert info.value.reason == "module rejected its params: unknown param 'treshold' (not in the module's manifest)"
    worker = WorkerProcess("t", built["vibstats"].read_bytes(), 4096,
                           load_message("vibstats.wasm", "threshold=9\nhost.dsp=1\n"))   # host.* always pass
    worker.stop()


def test_the_manifest_defaults_are_what_the_module_does_without_them(tmp_path, built):
    """The documented defaults are the module's own: the same windows give the same features
    with no params as with every default written out."""
    manifest = schema.read_manifest(built["vibstats"])
    defaults = {k: s.default for k, s in manifest.params.items() if s.default is not None}
    assert set(defaults) == set(manifest.params)
    rng = np.random.default_rng(4)
    windows = [rng.standard_normal((3, 1024)).astype(np.float32) * (1 if i < 50 else 8) for i in range(60)]
    runs = []
    for params in ("", "".join(f"{k}={v}\n" for k, v in defaults.items())):
        worker = WorkerProcess("t", built["vibstats"].read_bytes(), HEADER.size + windows[0].nbytes,
                               load_message("vibstats.wasm", params))
        try:
            runs.append([(r["f"], r["e"]) for r in (worker.process(pack_header(3, 1024, 12800.0, i), w, 5.0)
                                                     for i, w in enumerate(windows))])
        finally:
            worker.stop()
    assert runs[0] == runs[1] and any(events for _, events in runs[0])


@pytest.mark.parametrize("pattern, key, match", [
    ("threshold", "threshold", True), ("threshold", "thresholds", False), ("threshold", "thresh", False),
    ("signal.<n>.max", "signal.12.max", True), ("signal.<n>.max", "signal.x.max", False),
    ("signal.<n>.max", "signal..max", False), ("signal.<n>.max", "signal.1.max.x", False),
    ("zone.<name>", "zone.dock", True), ("zone.<name>", "zone.dock.a:1", True), ("zone.<name>", "zone.", False),
    ("severity.<name>", "severity.ball", True), ("a.<name>.b", "a.x.y.b", False), ("a.<name>.b", "a.x-1.b", True),
])
def test_the_c_and_the_host_read_key_patterns_alike(tmp_path_factory, pattern, key, match):
    assert schema.key_matches(pattern, key) is match
    require_tool("gcc", "gcc")
    work = tmp_path_factory.mktemp("keys")
    (work / "k.c").write_text(f'''
#define AP_WINDOW_BYTES 128
#include <stdio.h>
#include "ap_module.h"
void ap_host_log(int32_t l, const char *m, int32_t n) {{ (void)l; (void)m; (void)n; }}
void ap_host_feature(const char *n, int32_t l, double v) {{ (void)n; (void)l; (void)v; }}
void ap_host_event(int32_t s, double x, const char *m, int32_t n) {{ (void)s; (void)x; (void)m; (void)n; }}
int32_t ap_init(const char *p, int32_t n) {{ (void)p; (void)n; return 0; }}
int32_t ap_process(const uint8_t *w, int32_t n) {{ (void)w; (void)n; return 0; }}
int main(void) {{ printf("%d", ap_param_key_matches("{pattern}", "{key}", {len(key)})); return 0; }}
''')
    subprocess.run(["gcc", "-O1", f"-I{REPO / 'modules' / 'sdk'}", str(work / "k.c"), "-o", str(work / "k")],
                   check=True, capture_output=True)
    assert subprocess.run([str(work / "k")], capture_output=True, text=True).stdout == str(int(match))


def test_params_text_is_what_the_manifest_judged(built):
    """The host checks the same keys the module receives."""
    cfg_params = {**BEARING, "iso": {"group": 1}}
    keys = {k for k, _ in schema.leaves(cfg_params)}
    sent = {line.split("=")[0] for line in module_params_text(
        type("M", (), {"params": cfg_params, "host_dsp": True, "host_nn": False})()).splitlines()}
    assert {".".join(k) for k in keys} == sent - {"host.dsp", "host.features", "host.nn"}


@pytest.mark.parametrize("params, problem", [
    ({"threshold": 10 ** 400}, "is invalid: threshold is a number"),       # beyond any double: no traceback
    ({"threshold": "1e-3"}, None),                                          # YAML 1.1 reads it as text; C reads a number
    ({"threshold": "six"}, "'six' is invalid: threshold is a number"),
    ({"baseline": {"windows": 2.0}}, None),
    ({"baseline": {"windows": "40"}}, None),
])
def test_values_are_judged_as_the_module_reads_them(tmp_path, built, params, problem):
    path = write(tmp_path, built["vibstats"], params)
    if problem is None:
        load_config(path)
    else:
        assert any(problem in p for p in issues(path)), issues(path)


def test_choices_names_and_indices_as_the_module_takes_them(tmp_path, built):
    base = {"signal.0": {"max": 1}}
    good = write(tmp_path, built["process"], {**base, "severity": {"range": "2", "rate": 1},
                                              "signal.1": {"name": 123, "max": 2}})
    path = good.parent / "good.yaml"
    path.write_text(good.read_text().replace("window: {size: 4096}", "window: {size: 16, hop: 1}")
                    if "window" in good.read_text() else good.read_text())
    load_config(path)
    bad = write(tmp_path, built["process"], {**base, "signal.32": {"max": 1}, "severity": {"jump": 2.5}})
    text = "\n".join(issues(bad))
    assert "signal.32.max: 32 is beyond 31, the largest number module process takes there" in text
    assert "2.5 is invalid: severity.jump is one of" in text


def test_the_c_number_parser_reads_what_python_writes(tmp_path):
    """ap_parse_f64 against strtod: exact for the values configs hold, refusing the rest, and no
    read beyond its table on absurd exponents (it once indexed past pow10 on 1e-400)."""
    require_tool("gcc", "gcc")
    (tmp_path / "p.c").write_text(r'''
#define AP_WINDOW_BYTES 128
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ap_module.h"
void ap_host_log(int32_t l, const char *m, int32_t n) { (void)l; (void)m; (void)n; }
void ap_host_feature(const char *n, int32_t l, double v) { (void)n; (void)l; (void)v; }
void ap_host_event(int32_t s, double x, const char *m, int32_t n) { (void)s; (void)x; (void)m; (void)n; }
int32_t ap_init(const char *p, int32_t n) { (void)p; (void)n; return 0; }
int32_t ap_process(const uint8_t *w, int32_t n) { (void)w; (void)n; return 0; }
int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        int ok; double v = ap_parse_f64(argv[i], (int32_t)strlen(argv[i]), &ok);
        printf("%d %.17g\n", ok, v);
    }
    return 0;
}
''')
    subprocess.run(["gcc", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                    f"-I{REPO / 'modules' / 'sdk'}", str(tmp_path / "p.c"), "-o", str(tmp_path / "p")],
                   check=True, capture_output=True)
    exact = ["0.05", "0.7", "1.537", "0.3126", "12800", "-4999.0", "1e-05", "0.00392157", "3.14159", "99.99",
             "1e+22", "6.02e+23", ".5", "5.", "-0", "000.5", "123456789.125"]
    refused = ["1e", "", "-", "1.2.3", "0x10", "nan", "inf", "1e400", "1e99999", "88E-34656480", "1e-400x"]
    out = subprocess.run([str(tmp_path / "p"), *exact, *refused], capture_output=True, text=True, check=True)
    rows = [line.split() for line in out.stdout.splitlines()]
    for text, (ok, value) in zip(exact, rows[:len(exact)]):
        assert ok == "1" and float(value) == float(text), text
    for text, (ok, _) in zip(refused, rows[len(exact):]):
        assert ok == "0", text


def test_the_params_table_has_as_many_cells_in_every_row():
    """A choice's range is joined with "|" (kurtogram | fixed): in a markdown table it must be
    escaped, or the row gets cells the header has not (review 1, finding 13)."""
    import re
    manifest = load_manifest(REPO / "modules" / "src" / "bearing").params
    rows = schema.table(manifest).splitlines()
    cells = [len(re.split(r"(?<!\\)\|", row)) for row in rows]
    assert len(set(cells)) == 1, [r for r, c in zip(rows, cells) if c != cells[0]]
    assert r"kurtogram \| fixed" in schema.table(manifest)


@pytest.mark.parametrize("key, value, problem", [
    ("band", "wide", "diagnosis.band is one of kurtogram, fixed"),
    ("prewhiten", "yes", "diagnosis.prewhiten is one of none, cepstrum"),
    ("envelope", "cubed", "diagnosis.envelope is one of magnitude, squared"),
    ("windows", 0, "diagnosis.windows must be >= 1"),
    ("windows", 65, "diagnosis.windows must be >= 1, <= 64"),
    ("windows", 2.5, "diagnosis.windows is a whole number"),
    ("min_confidence", 0, "diagnosis.min_confidence must be > 0"),
    ("min_confidence", 1.5, "diagnosis.min_confidence must be > 0, <= 1"),
    ("margin", -0.1, "diagnosis.margin must be >= 0"),
    ("margin", 1, "diagnosis.margin must be >= 0, < 1"),
    ("second_opinion", "gpt", "diagnosis.second_opinion is one of none, bearing_cnn"),
    ("cnn_min_p", 0.25, "diagnosis.cnn_min_p must be > 0.25"),
    ("cnn_min_p", 2, "diagnosis.cnn_min_p must be > 0.25, <= 1"),
])
def test_bad_diagnosis_params_are_refused_by_the_host(tmp_path, built, key, value, problem):
    """The eight diagnosis.* params of the bearing module, judged at config load (the module's
    own refusal of the same values: tests/test_bearing_module.py)."""
    path = write(tmp_path, built["bearing"], {**BEARING, "diagnosis": {key: value}})
    assert any(problem in p for p in issues(path)), issues(path)
