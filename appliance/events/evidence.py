"""What travels with an event as its evidence: the camera frame with the module's boxes drawn
(cameras), or the samples of the triggering window (sensors), within the size limit."""
from __future__ import annotations

import io

import numpy as np

from appliance.events.record import Attachment


def boxes_from_features(features: dict[str, float], limit: int = 16) -> list[tuple[int, int, int, int]]:
    """The module's boxes by the ABI's naming: box<i>.x, .y, .w, .h (pixels of its frame)."""
    boxes = []
    for i in range(limit):
        keys = [f"box{i}.{k}" for k in "xywh"]
        if not all(k in features for k in keys):
            break
        x, y, w, h = (features[k] for k in keys)
        if all(v == v for v in (x, y, w, h)) and w > 0 and h > 0:
            boxes.append((int(x), int(y), int(w), int(h)))
    return boxes


def attachments(data: np.ndarray, image: tuple[int, int] | None, features: dict[str, float], *, max_bytes: int,
                attach_window: bool) -> list[Attachment]:
    """data: the window as the module got it (channels, frames), image: its (height, width) for
    a camera frame. A snapshot for a frame; the middle of the window as window.npy otherwise."""
    if image is not None:
        from hal.drivers.camera.jpeg import jpeg_snapshot   # OpenCV stays in hal/
        jpg = jpeg_snapshot(data, image, boxes_from_features(features), max_bytes=max_bytes)
        return [Attachment("snapshot.jpg", "image/jpeg", jpg)]
    if not attach_window:
        return []
    frames = max(1, (max_bytes - 256) // (data.shape[0] * data.itemsize))
    if data.shape[1] > frames:   # keep the middle of the window: around what triggered it
        start = (data.shape[1] - frames) // 2
        data = data[:, start:start + frames]
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(data), allow_pickle=False)
    return [Attachment("window.npy", "application/x-npy", buf.getvalue())]
