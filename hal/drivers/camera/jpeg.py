"""Evidence pictures: a camera frame as JPEG with boxes drawn, encoded with OpenCV."""
from __future__ import annotations

import cv2
import numpy as np

BOX_COLOR = (0, 0, 255)   # red in BGR


def jpeg_snapshot(planes: np.ndarray, image: tuple[int, int], boxes: list[tuple[int, int, int, int]],
                  max_bytes: int = 256 << 10, quality: int = 85) -> bytes:
    """planes: uint8 (channels, height*width), 1 (gray) or 3 (BGR) planes; boxes: (x, y, w, h).
    The JPEG stays under max_bytes: lower quality first, then half the size."""
    h, w = image
    frame = planes.reshape(h, w) if planes.shape[0] == 1 else planes.T.reshape(h, w, planes.shape[0])
    frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR) if frame.ndim == 2 else np.ascontiguousarray(frame)
    thickness = max(2, min(h, w) // 160)   # thinner lines lose their colour to JPEG chroma subsampling
    for x, y, bw, bh in boxes:
        cv2.rectangle(frame, (int(x), int(y)), (int(x + bw - 1), int(y + bh - 1)), BOX_COLOR, thickness)
    while True:
        ok, jpg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise ValueError("JPEG encoding failed")
        if len(jpg) <= max_bytes or (quality <= 40 and min(frame.shape[:2]) < 64):
            return jpg.tobytes()
        if quality > 40:
            quality -= 15
        else:
            frame = cv2.resize(frame, (frame.shape[1] // 2, frame.shape[0] // 2), interpolation=cv2.INTER_AREA)
