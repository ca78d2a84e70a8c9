"""What `make run` promises: the default config (simulated sensors) runs as a real process,
reports the injected bearing fault within 10 s of its onset, and serves metrics."""
from __future__ import annotations

import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import yaml

from appliance.config.schema import DEFAULT_CONFIG

from conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_default_config_reports_injected_fault_and_serves_metrics(tmp_path, vibstats_wasm):
    doc = yaml.safe_load(DEFAULT_CONFIG.read_text())
    port = free_port()
    doc["gateway"]["data_dir"] = str(tmp_path / "var")
    doc["metrics"]["port"] = port
    for name, mod in doc["modules"].items():   # as shipped (make test builds them), vibstats from source
        mod["wasm"] = str(vibstats_wasm if name == "spindle_stats" else (DEFAULT_CONFIG.parent / mod["wasm"]).resolve())
    fault_after = doc["sources"]["spindle"]["fault"]["start_s"]
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump(doc))

    proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(path)], cwd=REPO,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: queue.Queue[tuple[float, str]] = queue.Queue()
    threading.Thread(target=lambda: [lines.put((time.monotonic(), l)) for l in proc.stderr], daemon=True).start()
    log: list[str] = []
    try:
        running_at = event_at = None
        deadline = time.monotonic() + fault_after + 30
        while event_at is None and time.monotonic() < deadline:
            try:
                at, line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            log.append(line)
            if "running gateway" in line:
                running_at = at
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                assert 'appliance_source_samples_total{source="spindle"}' in body
            if "EVENT" in line and " spindle/" in line:   # the camera's motion events come and go meanwhile
                event_at = at
        assert running_at is not None, "".join(log)
        assert event_at is not None, "no event:\n" + "".join(log)
        # The fault starts fault_after seconds after the source opened (right after "running").
        assert fault_after - 0.5 <= event_at - running_at <= fault_after + 10, "".join(log)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'appliance_events_total{module="spindle_stats",severity="' in body
        processed = [l for l in body.splitlines() if l.startswith('appliance_module_windows_total{module="spindle_stats"}')]
        assert processed and float(processed[0].split()[-1]) > 50
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=15)
    assert rc == 0
    time.sleep(0.2)
    assert any("stopped;" in l for l in log + [l for _, l in list(lines.queue)])
