"""A network camera for tests: MJPEG over HTTP (multipart/x-mixed-replace), the protocol of
many IP cameras, served on 127.0.0.1 and stoppable mid-stream to test reconnects."""
from __future__ import annotations

import http.server
import socketserver
import threading
import time

import cv2
import numpy as np


class MjpegCamera:
    def __init__(self, port: int = 0, fps: float = 20.0, size: tuple[int, int] = (160, 120)) -> None:
        self.fps, self.size, self.frames = fps, size, 0
        self.stopping = threading.Event()
        camera = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):   # keep test output clean
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    while not camera.stopping.is_set():
                        self.wfile.write(camera.part())
                        time.sleep(1.0 / camera.fps)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._httpd = Server(("127.0.0.1", port), Handler)
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/stream.mjpg"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def part(self) -> bytes:
        w, h = self.size
        img = np.full((h, w), (self.frames * 7) % 255, np.uint8)
        ok, jpg = cv2.imencode(".jpg", img)
        self.frames += 1
        return b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg) + jpg.tobytes() + b"\r\n"

    def stop(self) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
