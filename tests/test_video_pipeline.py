"""Camera frames through the real pipeline: camera source -> frame windows (uint8, width and
height in the header) -> a wasm module in its worker."""
from __future__ import annotations

import pytest

from appliance.config.schema import ConfigError
from appliance.core.supervisor import Supervisor

from conftest import shared_file
from hostile_modules.hostile import build_hostile
from support import metric, wait_for, write_config


def collect(sup, module):
    seen = []
    host = sup.modules[module]
    sup.subscribe(lambda name, w, r: seen.append(r.features) if name == host.name else None)
    return seen


def test_simulated_camera_frames_reach_an_image_module(tmp_path):
    wasm = build_hostile("framestats", tmp_path / "m")
    cfg = write_config(tmp_path, {"cam": {"type": "camera", "simulate": True, "fps": 20, "resize": [160, 120]}},
                       {"frames": {"wasm": str(wasm), "source": "cam"}})
    sup = Supervisor(cfg)
    seen = collect(sup, "frames")
    sup.start()
    try:
        wait_for(lambda: len(seen) >= 8, 15, "frames processed")
    finally:
        sup.stop()
    assert all(f["width"] == 160 and f["height"] == 120 and f["channels"] == 1 for f in seen)
    assert 60 < seen[-1]["mean"] < 200 and seen[-1]["motion"] > 0
    assert metric(sup, "appliance_module_windows_rejected_total", module="frames") == 0


def test_video_file_every_fifth_frame(tmp_path):
    wasm = build_hostile("framestats", tmp_path / "m")
    video = shared_file("video", "vtest.avi")
    cfg = write_config(tmp_path, {"cam": {"type": "camera", "url": str(video), "realtime": False,
                                          "resize": [384, 288]}},
                       {"frames": {"wasm": str(wasm), "source": "cam", "window": {"size": 1, "hop": 5},
                                   "overflow": "block"}})
    sup = Supervisor(cfg)
    seen = collect(sup, "frames")
    sup.start()
    try:
        assert sup.wait_until_done(60)
    finally:
        sup.stop()
    assert len(seen) == 159                                   # 795 frames, every fifth
    assert all(f["width"] == 384 and f["height"] == 288 for f in seen)
    assert sum(f["motion"] > 1 for f in seen[1:]) > 100       # pedestrians walking


def test_sample_module_refuses_frames_and_config_rules(tmp_path, vibstats_wasm):
    with pytest.raises(ConfigError, match="a camera's window is one frame"):
        write_config(tmp_path, {"cam": {"type": "camera", "simulate": True}},
                     {"m": {"wasm": str(vibstats_wasm), "source": "cam", "window": {"size": 64}}})
    with pytest.raises(ConfigError, match="required option 'window' is missing from modules.m"):
        write_config(tmp_path, {"s": {"type": "sim_vibration"}}, {"m": {"wasm": str(vibstats_wasm), "source": "s"}})
    cfg = write_config(tmp_path, {"cam": {"type": "camera", "simulate": True, "fps": 30, "resize": [64, 48]}},
                       {"m": {"wasm": str(vibstats_wasm), "source": "cam"}})
    sup = Supervisor(cfg)
    sup.start()
    try:
        wait_for(lambda: metric(sup, "appliance_module_windows_rejected_total", module="m") >= 3, 10,
                 "a float32 module to refuse image windows")
    finally:
        sup.stop()


def test_event_on_a_frame_carries_a_jpeg_with_the_boxes(tmp_path):
    import cv2
    import numpy as np

    from appliance.events.spool import Spool

    wasm = build_hostile("eventbox", tmp_path / "m")
    cfg = write_config(tmp_path, {"cam": {"type": "camera", "simulate": True, "fps": 30, "resize": [160, 120]}},
                       {"dock": {"wasm": str(wasm), "source": "cam"}})
    sup = Supervisor(cfg)
    sup.start()
    try:
        wait_for(lambda: sup.events_emitted >= 1, 10, "the event")
    finally:
        sup.stop()
    spool = Spool(cfg.gateway.data_dir / "spool.db", 1 << 24)
    [event] = spool.tail(10)
    [meta] = event["attachments"]
    data = spool.attachment(event["id"], "snapshot.jpg")
    spool.close()
    assert meta["name"] == "snapshot.jpg" and meta["type"] == "image/jpeg" and meta["size"] == len(data)
    assert (event["window"]["width"], event["window"]["height"]) == (160, 120)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (120, 160, 3)
    b, g, r = (img[:, :, i].astype(int) for i in range(3))
    red = (r > 120) & (r - g > 60) & (r - b > 60)
    assert red[10, 15:45].mean() > 0.8 and red[39, 15:45].mean() > 0.8      # top and bottom edges
    assert red[15:35, 10].mean() > 0.8 and red[60:100, 100:140].mean() < 0.01
