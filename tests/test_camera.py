"""The camera source on the real sample video, a truncated copy of it, and the simulator."""
from __future__ import annotations

import time

import numpy as np
import pytest

from hal.source import Health
from hal.sources.camera import CameraConfig, CameraSource

from conftest import shared_file


def camera(**kw) -> CameraSource:
    return CameraSource("cam", CameraConfig(type="camera", **kw))


def read_all(src, limit=10_000):
    blocks = []
    while len(blocks) < limit:
        b = src.read()
        if b is None:
            break
        blocks.append(b)
    return blocks


def test_video_file_gray_resized_with_file_timestamps():
    path = shared_file("video", "vtest.avi")
    src = camera(url=str(path), resize=(320, 240), realtime=False)
    src.open()
    try:
        assert src.info.sample_rate == pytest.approx(10.0) and src.info.channels == ("gray",)
        blocks = read_all(src)
    finally:
        src.close()
    assert len(blocks) == 795                      # every frame of the recording
    b = blocks[10]
    assert b.image == (240, 320) and b.data.shape == (1, 240 * 320) and b.data.dtype == np.uint8
    assert 20 < b.data.mean() < 235                # a real image, not blank
    steps = np.diff([x.start_ns for x in blocks])
    assert np.all(steps > 0) and np.median(steps) == pytest.approx(100e6, rel=0.01)   # 10 fps
    assert src.health[0] is Health.ENDED and src.stream_errors == 0 and src.frames_dropped == 0


def test_color_frames_are_planar_bgr():
    src = camera(url=str(shared_file("video", "vtest.avi")), gray=False, realtime=False)
    src.open()
    b = src.read()
    src.close()
    assert b.image == (576, 768) and b.data.shape == (3, 576 * 768)


def test_truncated_file_ends_cleanly_with_a_counted_error(tmp_path, caplog):
    data = shared_file("video", "vtest.avi").read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 3])
    src = camera(url=str(cut), realtime=False)
    src.open()
    blocks = read_all(src)
    src.close()
    assert 0 < len(blocks) < 795
    health, reason = src.health
    assert health is Health.ENDED and src.stream_errors == 1
    assert "truncated or corrupt" in reason
    # ... and the log says it too, with how many frames were read of how many the file announced
    assert f"stream ended at frame {len(blocks)} of 795 (truncated or corrupt file)" in caplog.text


def test_garbage_file_fails_to_open(tmp_path):
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"\x00not a video" * 1000)
    with pytest.raises(OSError, match="cannot open camera"):
        camera(url=str(bad)).open()
    with pytest.raises(OSError, match="video file not found"):
        camera(url=str(tmp_path / "none.avi")).open()


def test_realtime_file_is_paced():
    src = camera(url=str(shared_file("video", "vtest.avi")), resize=(64, 48))
    src.open()
    t0 = time.monotonic()
    for _ in range(6):
        src.read()
    src.close()
    assert 0.4 <= time.monotonic() - t0 <= 0.9     # 6 frames at 10 fps: 0.5 s


def test_simulated_scene_moves():
    src = camera(simulate=True, fps=50, resize=(160, 120))
    src.open()
    frames = [src.read() for _ in range(10)]
    src.close()
    assert all(f.image == (120, 160) for f in frames)
    a, b = frames[0].data.astype(int), frames[-1].data.astype(int)
    changed = np.mean(np.abs(a - b) > 40)
    assert 0.005 < changed < 0.3                   # objects moved; the background did not


def test_config_needs_url_or_simulate():
    with pytest.raises(ValueError, match="give the camera's url"):
        CameraConfig(type="camera")
    assert CameraConfig(type="camera", url="/dev/video0", simulate=True).simulate   # simulate wins


def test_network_camera_disconnect_and_reconnect(tmp_path):
    from appliance.core.supervisor import Supervisor

    from camera_peer import MjpegCamera
    from support import metric, wait_for, write_config

    cam = MjpegCamera()
    cfg = write_config(tmp_path, {"ipcam": {"type": "camera", "url": cam.url, "timeout_s": 0.5}}, {})
    sup = Supervisor(cfg)
    import appliance.core.supervisor as supervisor_module
    supervisor_module.SOURCE_BACKOFF_S = (0.2, 0.5)   # keep the test short; the logic is the same
    frames = lambda: metric(sup, "appliance_source_samples_total", source="ipcam")   # noqa: E731
    sup.start()
    try:
        wait_for(lambda: frames() > 160 * 120 * 5, 10, "frames from the camera")
        port = cam.port
        cam.stop()                                                         # the camera goes away
        wait_for(lambda: metric(sup, "appliance_source_errors_total", source="ipcam") >= 2, 10,
                 "the loss to be counted and retried")
        assert sup.sources["ipcam"].health[0] is Health.FAILED
        assert metric(sup, "appliance_source_up", source="ipcam") == 0
        cam = MjpegCamera(port=port)                                       # it comes back
        before = frames()
        wait_for(lambda: frames() > before + 160 * 120 * 5, 15, "frames after the reconnect")
        assert sup.sources["ipcam"].health[0] is Health.OK
    finally:
        sup.stop()
        cam.stop()
        supervisor_module.SOURCE_BACKOFF_S = (0.5, 30.0)


def test_frames_larger_than_max_frame_are_dropped_and_counted(caplog):
    """A module's buffer holds max_frame; a larger frame never reaches it (and is never its fault)."""
    src = camera(url=str(shared_file("video", "vtest.avi")), max_frame=(640, 480), realtime=False)   # 768 x 576
    src.open()
    try:
        assert src.info.frame_pixels == 640 * 480
        assert src.read() is None                   # every frame is too large: the file ends
    finally:
        src.close()
    assert src.frames_oversize == 795
    assert "768x576 are larger than max_frame 640x480" in caplog.text
    with pytest.raises(ValueError, match="resize 800x600 is larger than max_frame 640x480"):
        CameraConfig(type="camera", url="x.avi", max_frame=(640, 480), resize=(800, 600))
