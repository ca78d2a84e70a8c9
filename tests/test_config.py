"""Config errors name file:line, the key path, the bad value and the reason; nothing starts."""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from appliance.config.schema import DEFAULT_CONFIG, ConfigError, load_config, params_text

from conftest import REPO


def write(tmp_path: Path, text: str, wasm: Path) -> Path:
    path = tmp_path / "gw.yaml"
    path.write_text(textwrap.dedent(text).replace("@WASM@", str(wasm)))
    return path


GOOD = """\
gateway:
  name: test-gw
  data_dir: var
metrics:
  port: 0
sources:
  spindle:
    type: sim_vibration
    sample_rate: 12800
    axes: [x, y, z]
modules:
  stats:
    wasm: @WASM@
    source: spindle
    window:
      size: 4096
      hop: 2048
    params:
      threshold: 6
      baseline:
        windows: 40
"""


def issues_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(i) for i in info.value.issues]


def test_default_config_is_valid_and_simulated(vibstats_wasm):
    cfg = load_config(DEFAULT_CONFIG)
    # Every source is simulated: no hardware needed to run it.
    for name, src in cfg.sources.items():
        assert src.type == "sim_vibration" or getattr(src, "emulate", False) or getattr(src, "simulate", False), name
    assert {s.type for s in cfg.sources.values()} >= {"sim_vibration", "i2c_accel", "modbus_rtu", "nmea"}
    assert cfg.modules and all(m.source in cfg.sources for m in cfg.modules.values())


def test_good_config_resolves_relative_paths(tmp_path, vibstats_wasm):
    cfg = load_config(write(tmp_path, GOOD, vibstats_wasm))
    assert cfg.gateway.data_dir == tmp_path / "var"
    assert cfg.modules["stats"].window.hop_frames == 2048
    assert params_text(cfg.modules["stats"].params) == "baseline.windows=40\nthreshold=6\n"


def test_unknown_key_says_line_and_did_you_mean(tmp_path, vibstats_wasm):
    path = write(tmp_path, GOOD.replace("    sample_rate: 12800", "    sample_rat: 12800"), vibstats_wasm)
    [issue] = issues_of(path)
    assert issue == (f"{path}:9:5: sources.spindle.sample_rat: 'sample_rat' is not a valid option for "
                     f"sources.spindle (sim_vibration). Did you mean 'sample_rate'?")


def test_unknown_top_level_key_lists_options_when_nothing_is_close(tmp_path, vibstats_wasm):
    path = write(tmp_path, GOOD + "zzz: 1\n", vibstats_wasm)
    [issue] = issues_of(path)
    assert issue.startswith(f"{path}:22:1: zzz: 'zzz' is not a valid option for the top level. Valid options: ")
    assert "modules" in issue


def test_wrong_type_names_value_and_reason(tmp_path, vibstats_wasm):
    path = write(tmp_path, GOOD.replace("size: 4096", "size: big"), vibstats_wasm)
    [issue] = issues_of(path)
    assert issue.startswith(f"{path}:16:13: modules.stats.window.size: 'big' is invalid: ")
    assert "integer" in issue


def test_out_of_range_value(tmp_path, vibstats_wasm):
    path = write(tmp_path, GOOD.replace("  port: 0", "  port: 70000"), vibstats_wasm)
    [issue] = issues_of(path)
    assert issue.startswith(f"{path}:5:9: metrics.port: 70000 is invalid: ")
    assert "65535" in issue


def test_missing_module_file(tmp_path, vibstats_wasm):
    path = write(tmp_path, GOOD, tmp_path / "nope.wasm")
    [issue] = issues_of(path)
    assert issue.startswith(f"{path}:13:11: modules.stats.wasm: ")
    assert f"module file not found: {tmp_path / 'nope.wasm'}" in issue


def test_missing_required_key_points_at_its_section(tmp_path, vibstats_wasm):
    path = write(tmp_path, GOOD.replace("    source: spindle\n", ""), vibstats_wasm)
    [issue] = issues_of(path)
    assert issue == f"{path}:12:3: modules.stats.source: required option 'source' is missing from modules.stats"


def test_unknown_source_reference_suggests(tmp_path, vibstats_wasm):
    path = write(tmp_path, GOOD.replace("source: spindle", "source: spindel"), vibstats_wasm)
    [issue] = issues_of(path)
    assert issue == (f"{path}:14:13: modules.stats.source: 'spindel' is not a source defined in this file. "
                     f"Did you mean 'spindle'?")


def test_unknown_source_type(tmp_path, vibstats_wasm):
    path = write(tmp_path, GOOD.replace("type: sim_vibration", "type: sim_vibraton"), vibstats_wasm)
    [issue] = issues_of(path)
    assert issue.startswith(f"{path}:8:11: sources.spindle.type: 'sim_vibraton' is not a known source type")
    assert "Did you mean 'sim_vibration'?" in issue


def test_unknown_channel(tmp_path, vibstats_wasm):
    path = write(tmp_path, GOOD.replace("    source: spindle\n", "    source: spindle\n    channels: [x, w]\n"),
                 vibstats_wasm)
    [issue] = issues_of(path)
    assert issue.startswith(f"{path}:15:19: modules.stats.channels.1: 'w' is not a channel of source 'spindle'")


def test_duplicate_key_is_an_error(tmp_path, vibstats_wasm):
    path = write(tmp_path, GOOD.replace("    axes: [x, y, z]", "    axes: [x, y, z]\n    sample_rate: 100"),
                 vibstats_wasm)
    [issue] = issues_of(path)
    assert issue.startswith(f"{path}:11:5: duplicate key 'sample_rate' in sources.spindle (first defined at line 9)")


def test_yaml_syntax_error(tmp_path, vibstats_wasm):
    path = write(tmp_path, GOOD.replace("  port: 0", "  port: [0"), vibstats_wasm)
    [issue] = issues_of(path)
    assert issue.startswith(f"{path}:") and "YAML syntax error" in issue


def test_several_errors_reported_at_once_in_line_order(tmp_path, vibstats_wasm):
    text = GOOD.replace("  port: 0", "  port: -1").replace("size: 4096", "size: 0").replace("noise", "x")
    issues = issues_of(write(tmp_path, text, vibstats_wasm))
    assert [i.split(":")[1] for i in issues] == ["5", "16"]


def test_hop_and_overlap_together_rejected(tmp_path, vibstats_wasm):
    path = write(tmp_path, GOOD.replace("hop: 2048", "hop: 2048\n      overlap: 0.5"), vibstats_wasm)
    [issue] = issues_of(path)
    assert "give either hop or overlap, not both" in issue and f"{path}:15:" in issue


def test_block_overflow_refused_for_live_source(tmp_path, vibstats_wasm):
    path = write(tmp_path, GOOD.replace("    source: spindle\n", "    source: spindle\n    overflow: block\n"),
                 vibstats_wasm)
    [issue] = issues_of(path)
    assert "would stall live source 'spindle'" in issue


def test_polygons_in_params():
    from appliance.config.schema import params_text
    assert params_text({"zone": {"dock": [[0, 0], [320, 0.5], [320, 120]]}, "mask": [[1, 2]]}) == \
        "mask=1,2\nzone.dock=0,0;320,0.5;320,120\n"
    with pytest.raises(ValueError, match="a list of lists must hold numbers only"):
        params_text({"zone": [[0, "a"]]})


def test_bad_params_value(tmp_path, vibstats_wasm):
    path = write(tmp_path, GOOD.replace("threshold: 6", "threshold: {a: [1, {b: 2}]}"), vibstats_wasm)
    [issue] = issues_of(path)
    assert f"{path}:18:5: modules.stats.params: param threshold.a:" in issue and "lists may hold only" in issue


def test_validate_cli_fails_and_starts_nothing(tmp_path, vibstats_wasm):
    # A port that is free now: if validate started the metrics server, it would bind it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write(tmp_path, GOOD.replace("  port: 0", f"  port: {port}").replace("size: 4096", "size: -5"),
                 vibstats_wasm)
    proc = subprocess.run([sys.executable, "-m", "appliance", "validate", str(path)], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2
    assert f"{path}:16:13: modules.stats.window.size: -5 is invalid" in proc.stderr
    assert not (tmp_path / "var").exists()   # no spool, no data dir: nothing started


def test_validate_cli_ok(tmp_path, vibstats_wasm):
    proc = subprocess.run([sys.executable, "-m", "appliance", "validate", str(write(tmp_path, GOOD, vibstats_wasm))],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "ok (1 sources, 1 modules)" in proc.stdout


def test_run_with_bad_config_exits_nonzero(tmp_path, vibstats_wasm):
    path = write(tmp_path, GOOD.replace("sample_rate: 12800", "sample_rate: fast"), vibstats_wasm)
    proc = subprocess.run([sys.executable, "-m", "appliance", "run", "--config", str(path)], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2
    assert f"{path}:9:18: sources.spindle.sample_rate: 'fast' is invalid" in proc.stderr
    assert not (tmp_path / "var").exists()


def test_configuration_reference_is_current():
    from appliance.config.doc import render
    assert (REPO / "docs" / "configuration.md").read_text() == render(), \
        "docs/configuration.md is stale: python -m appliance.config.doc > docs/configuration.md"


def test_alias_bomb_and_recursive_alias_are_refused_quickly(tmp_path, vibstats_wasm):
    levels = ["a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\n")
    [issue] = issues_of(bomb)
    assert issue == f"{bomb}:1:1: the document expands to more than 100000 values (aliases?); a config is far smaller"
    loop = tmp_path / "loop.yaml"
    loop.write_text("sources: {}\na: &a [*a]\n")
    [issue] = issues_of(loop)
    assert issue.startswith(f"{loop}:2:") and "alias refers to itself" in issue


def test_infinite_and_nan_numbers_are_refused(tmp_path, vibstats_wasm):
    path = write(tmp_path, GOOD.replace("sample_rate: 12800", "sample_rate: .inf").replace("  port: 0",
                                                                                          "  port: .nan"),
                 vibstats_wasm)
    issues = issues_of(path)
    assert any(i.startswith(f"{path}:9:18: sources.spindle.sample_rate: inf is invalid: ") and "finite" in i
               for i in issues), issues
    assert any(i.startswith(f"{path}:5:9: metrics.port:") for i in issues), issues


def test_empty_section_and_non_text_key(tmp_path, vibstats_wasm):
    path = write(tmp_path, GOOD.replace("metrics:\n  port: 0\n", "metrics:\n") + "null: 3\n", vibstats_wasm)
    issues = issues_of(path)
    assert f"{path}:4:9: metrics: is empty, but needs a mapping of options" in issues
    assert any(i.startswith(f"{path}:21:1: None: the key None is not text") for i in issues), issues


def test_validate_checks_params_against_the_modules_manifest(tmp_path, vibstats_wasm):
    path = write(tmp_path, GOOD.replace("threshold: 6", "threshold: -1"), vibstats_wasm)
    proc = subprocess.run([sys.executable, "-m", "appliance", "validate", str(path)], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2
    assert f"{path}:19:18: modules.stats.params.threshold: -1 is invalid: threshold must be > 0" in proc.stderr, \
        proc.stderr
    assert not (tmp_path / "var").exists()


def test_validate_lets_the_module_judge_its_params(tmp_path):
    """What a manifest cannot say (or a module without one) the module itself judges, in a
    throwaway worker: its ap_init message, at the module's params line."""
    from appliance_tools.modbuild import build_module
    bare = build_module(REPO / "modules" / "src" / "vibstats" / "vibstats.c", tmp_path / "bare.wasm").out
    path = write(tmp_path, GOOD.replace("threshold: 6", "threshold: -1"), bare)
    proc = subprocess.run([sys.executable, "-m", "appliance", "validate", str(path)], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2
    assert (f"{path}:18:5: modules.stats.params: module rejected its params: threshold must be positive"
            in proc.stderr), proc.stderr
    assert "has no params manifest" in proc.stderr
    assert not (tmp_path / "var").exists()


def test_reserved_host_params(tmp_path, vibstats_wasm):
    """host.* params are the appliance's: nested or dotted, a YAML param cannot set them (a param
    named "host.nn" once turned on native code although host_nn was false)."""
    for text in ("host: {dsp: 1}", "host.nn: 1", "'host.dsp': 0"):
        path = write(tmp_path, GOOD.replace("threshold: 6", f"threshold: 6\n      {text}"), vibstats_wasm)
        [issue] = issues_of(path)
        assert f"{path}:18:5: modules.stats.params: param '{text.split(':')[0].strip(chr(39))}': 'host' and " \
               "'host.*' are reserved" in issue, issue


def test_device_or_fifo_as_config_is_refused(tmp_path):
    import os
    for path, reason in ((Path("/dev/zero"), "not a regular file"), (tmp_path / "fifo", "not a regular file")):
        if path.name == "fifo":
            os.mkfifo(path)
        with pytest.raises(ConfigError, match=reason):
            load_config(path)


def test_a_path_the_system_cannot_look_up_is_a_config_error(tmp_path, vibstats_wasm):
    """Found by the config fuzz campaign: a name longer than the file system allows made
    `appliance validate` end in a traceback (OSError: File name too long)."""
    path = write(tmp_path, GOOD.replace("@WASM@", str(tmp_path / ("y" * 300 + ".wasm"))), vibstats_wasm)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (issue,) = info.value.issues
    assert "File name too long" in issue.message and issue.mark.line > 1


def test_a_character_yaml_forbids_is_an_error_at_its_place(tmp_path, vibstats_wasm):
    """Found by the config fuzz campaign: a NUL byte made `appliance validate` end in a traceback."""
    path = write(tmp_path, GOOD.replace("name: test-gw", "name: test\x00gw"), vibstats_wasm)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (issue,) = info.value.issues
    assert (issue.mark.line, issue.mark.column) == (2, 13) and "is not allowed" in issue.message
