"""Cameras through OpenCV: a V4L2 device (/dev/video0), a video file, or an RTSP URL.

Each frame is one Block: uint8, planar (channels, height*width), with Block.image = (height,
width). Grayscale conversion and resizing happen here, on the host, so a module receives the
small frame it asked for. Timestamps: a file's own clock (CAP_PROP_POS_MSEC) for files, the
arrival time for live streams (their clocks are the camera's, unknown to us).

Faults: a live stream that stops delivering raises (the supervisor counts it, backs off and
reopens: that is the reconnect). A file that ends early (truncated, corrupt) ends the source
cleanly with the error counted. Frames the camera produced but we never saw (a timestamp jump
of more than 1.5 frame periods) are counted as dropped, and the next block is a gap.
`simulate: true` renders a synthetic scene (objects moving over a textured background) with
no OpenCV capture at all, for the default config and CI.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from hal.registry import register_source
from hal.schema import StrictModel
from hal.source import Block, Health, Source, SourceInfo

log = logging.getLogger("hal.camera")
_OVERSIZE = object()   # a frame larger than max_frame: read the next one


class CameraConfig(StrictModel):
    KIND: ClassVar[str] = "video"   # each block is a frame: modules get one frame per window
    type: Literal["camera"]
    url: str | None = Field(None, description="/dev/videoN, a camera index (0), a video file, or rtsp://...")
    simulate: bool = Field(False, description="render a synthetic scene instead of capturing url (demos, CI)")
    width: int | None = Field(None, ge=16, le=8192, description="capture width to request from the device")
    height: int | None = Field(None, ge=16, le=8192, description="capture height to request from the device")
    fps: float | None = Field(None, gt=0, le=1000, description="capture rate to request; a file plays at this "
                              "rate when realtime (default: the file's own)")
    fourcc: str | None = Field(None, pattern=r"^[A-Za-z0-9 ]{4}$", description="pixel format to request from a "
                               "V4L2 device, e.g. YUYV or MJPG (some drivers, like vivid, need YUYV for OpenCV)")
    gray: bool = Field(True, description="convert to grayscale on the host (1 channel), else 3 channels (BGR)")
    resize: tuple[int, int] | None = Field(None, description="[width, height] the module receives")
    max_frame: tuple[int, int] = Field((4096, 4096), description="[width, height] of the largest frame a module "
                                       "may get (sizes its shared buffer); a larger frame is dropped and counted")
    realtime: bool = Field(True, description="files: play at their frame rate (false: as fast as read)")
    loop: bool = Field(False, description="files: start over at the end")
    timeout_s: float = Field(5.0, gt=0, description="a live stream silent this long has failed")

    @model_validator(mode="after")
    def _source(self):
        if self.url is None and not self.simulate:
            raise ValueError("give the camera's url (or simulate: true)")
        if self.resize is not None and min(self.resize) < 8:
            raise ValueError(f"resize {list(self.resize)} is too small (at least 8 x 8)")
        if not (16 <= min(self.max_frame) and max(self.max_frame) <= 8192):
            raise ValueError(f"max_frame {list(self.max_frame)}: each side 16..8192")
        for what, (w, h) in (("resize", self.resize or (None, None)), ("width x height", (self.width, self.height))):
            if (w is not None and w > self.max_frame[0]) or (h is not None and h > self.max_frame[1]):
                raise ValueError(f"{what} {w}x{h} is larger than max_frame {self.max_frame[0]}x{self.max_frame[1]}")
        return self

    @property
    def is_file(self) -> bool:
        return self.url is not None and not self.simulate and not self.url.startswith(("/dev/", "rtsp://", "rtsps://", "http")) \
            and not self.url.isdigit()


@register_source("camera", CameraConfig)
class CameraSource(Source):
    COUNTERS = ("frames_dropped", "frames_oversize", "stream_errors")

    def __init__(self, name: str, config: CameraConfig) -> None:
        super().__init__(name, config)
        self._cap = None
        self._stop = threading.Event()
        self._cap_lock = threading.Lock()
        self._reading = False
        self._index = 0
        self._fps = config.fps or 10.0
        self._size = config.resize or ((config.width or 320), (config.height or 240))
        self._t0 = 0.0
        self._wall0 = 0
        self._last_pos_ms: float | None = None
        self._expected_frames: int | None = None
        self.frames_dropped = 0
        self.frames_oversize = 0
        self.stream_errors = 0
        self._sim_rng = np.random.default_rng(0)

    @property
    def info(self) -> SourceInfo:
        channels = ("gray",) if self.config.gray else ("b", "g", "r")
        return SourceInfo(self.name, "video", self._fps, channels, "u8",
                          frame_pixels=self.config.max_frame[0] * self.config.max_frame[1])

    # ---- lifecycle --------------------------------------------------------------------------------

    def open(self) -> None:
        self._stop.clear()
        self._index = 0
        self._last_pos_ms = None
        self._t0 = time.monotonic()
        self._wall0 = time.time_ns()
        if self.config.simulate:
            self._fps = self.config.fps or 10.0
            self.set_health(Health.OK)
            return
        import cv2
        url = self.config.url
        target = int(url) if url.isdigit() else url
        if self.config.is_file and not Path(url).exists():
            raise OSError(f"video file not found: {url}")
        # A /dev/videoN path goes to V4L2 itself: the default order may hand it to FFmpeg.
        cap = cv2.VideoCapture(target, cv2.CAP_V4L2) if url.startswith("/dev/video") else cv2.VideoCapture(target)
        if not cap.isOpened():
            raise OSError(f"cannot open camera {url!r} (device missing, busy, or URL unreachable)")
        if self.config.fourcc is not None:
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*self.config.fourcc))
        for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, self.config.width), (cv2.CAP_PROP_FRAME_HEIGHT,
                                                                             self.config.height),
                            (cv2.CAP_PROP_FPS, None if self.config.is_file else self.config.fps)):
            if value is not None:
                cap.set(prop, value)
        native_fps = cap.get(cv2.CAP_PROP_FPS)
        self._fps = self.config.fps or (native_fps if native_fps and native_fps > 0 else 25.0)
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self._expected_frames = count if self.config.is_file and count > 0 else None
        if self.config.resize is None:
            self._size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        self._cap = cap
        self.set_health(Health.OK)

    def close(self) -> None:
        # Releasing a VideoCapture while another thread is inside its read() is a use-after-free
        # in OpenCV: from another thread, only ask; the reading thread releases on its way out.
        self._stop.set()
        with self._cap_lock:
            if not self._reading:
                self._release()

    def _release(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    # ---- frames ---------------------------------------------------------------------------------

    def read(self) -> Block | None:
        with self._cap_lock:
            self._reading = True
        try:
            block = self._read()
            while block is _OVERSIZE and not self._stop.is_set():
                block = self._read()
            return None if block is _OVERSIZE else block
        finally:
            with self._cap_lock:
                self._reading = False
                if self._stop.is_set():
                    self._release()

    def _read(self) -> Block | None:
        if self.config.simulate:
            return self._simulated()
        import cv2
        cap = self._cap
        if cap is None:
            raise OSError(f"source {self.name!r}: the camera is closed")
        started = time.monotonic()
        while True:
            ok, frame = cap.read()
            if ok and frame is not None:
                break
            if self.config.is_file:
                return self._end_of_file(cap)
            if self._stop.is_set():
                raise OSError(f"camera {self.config.url!r}: closed")
            if time.monotonic() - started > self.config.timeout_s:
                raise OSError(f"camera {self.config.url!r}: no frame for {self.config.timeout_s:g} s (disconnected?)")
            time.sleep(0.05)
        gap = False
        if self.config.is_file:
            pos_ms = cap.get(cv2.CAP_PROP_POS_MSEC)
            start_ns = int(self._wall0 + pos_ms * 1e6)
            if self.config.realtime:
                due = self._t0 + pos_ms / 1000.0
                self._stop.wait(max(0.0, due - time.monotonic()))
        else:
            now = time.monotonic()
            pos_ms = (now - self._t0) * 1000.0
            start_ns = time.time_ns()
        if self._last_pos_ms is not None:
            missed = round((pos_ms - self._last_pos_ms) * self._fps / 1000.0) - 1
            if missed >= 1 and (pos_ms - self._last_pos_ms) > 1.5 * 1000.0 / self._fps:
                self.frames_dropped += missed
                gap = True
        self._last_pos_ms = pos_ms
        frame = self._prepare(frame, cv2)
        if frame.shape[1] > self.config.max_frame[0] or frame.shape[0] > self.config.max_frame[1]:
            # Larger than the modules' buffers: dropped here, counted, said once; never a module's fault.
            if not self.frames_oversize:
                log.error("camera %s: frames of %dx%d are larger than max_frame %dx%d; they are dropped "
                          "(set resize, or a larger max_frame)", self.name, frame.shape[1], frame.shape[0],
                          *self.config.max_frame)
            self.frames_oversize += 1
            return _OVERSIZE
        return self._block(frame, start_ns, gap)

    def _end_of_file(self, cap) -> Block | None:
        import cv2
        position = int(cap.get(cv2.CAP_PROP_POS_FRAMES))
        if self._expected_frames and position < self._expected_frames - 1:
            # A truncated or corrupt file: end cleanly, but say so and count it.
            self.stream_errors += 1
            reason = (f"stream ended at frame {position} of {self._expected_frames} "
                      f"(truncated or corrupt file)")
            self.set_health(Health.ENDED, reason)
            log.warning("camera %s: %s: %s", self.name, self.config.url, reason)
        else:
            self.set_health(Health.ENDED, "end of video")
            log.info("camera %s: %s ended after %d frames", self.name, self.config.url, position)
        if self.config.loop and position > 0:
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            self._t0 = time.monotonic()
            self._wall0 = time.time_ns()
            self._last_pos_ms = None
            self.set_health(Health.OK)
            return self._read()
        return None

    def _prepare(self, frame: np.ndarray, cv2) -> np.ndarray:
        if self.config.gray and frame.ndim == 3:
            frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        if self.config.resize is not None and (frame.shape[1], frame.shape[0]) != tuple(self.config.resize):
            frame = cv2.resize(frame, tuple(self.config.resize), interpolation=cv2.INTER_AREA)
        return frame

    def _block(self, frame: np.ndarray, start_ns: int, gap: bool) -> Block:
        h, w = frame.shape[:2]
        planar = frame.reshape(h * w, -1).T if frame.ndim == 3 else frame.reshape(1, h * w)
        index = self._index
        self._index += 1
        return Block(np.ascontiguousarray(planar, dtype=np.uint8), start_ns, index, gap, image=(h, w))

    def _simulated(self) -> Block:
        """The synthetic scene (hal/sim/camera_scene.py), paced at fps."""
        from hal.sim import camera_scene
        due = self._t0 + self._index / self._fps
        self._stop.wait(max(0.0, due - time.monotonic()))
        frame = camera_scene.render(self._index / self._fps, self._size, self._sim_rng, self.config.gray)
        return self._block(frame, time.time_ns(), False)
