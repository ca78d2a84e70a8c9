"""A new OpenCV must not be able to kill a worker (issue: 5.1 reserved more address space than
4.14 and the old address-space cap starved the camera worker). The camera tests that load
OpenCV in a worker run here a second time under the previous major, installed beside the venv
from requirements/opencv4.txt (`make test` puts it in .venv/opencv4), and each run proves from
the worker's own memory map which OpenCV it loaded."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from appliance_tools.modbuild import build_module
from appliance.runtime.wire import HEADER, load_message, pack_header
from appliance.runtime.process import WorkerProcess
from conftest import REPO, require

OVERLAY = Path(sys.prefix) / "opencv4"
UNDER_BOTH = [
    "tests/test_motion_module.py::test_evaluation_reaches_its_documented_agreement",
    "tests/test_worker.py::test_memory_cap_stops_a_memory_hog",
    "tests/test_opencv_versions.py::test_the_camera_worker_loads_the_opencv_of_this_run",
]


def test_the_camera_worker_loads_the_opencv_of_this_run(tmp_path):
    import cv2
    want = os.environ.get("AP_EXPECT_OPENCV_MAJOR")
    if want:
        assert cv2.__version__.split(".")[0] == want, cv2.__version__
    wasm = build_module(REPO / "modules" / "src" / "motion", tmp_path / "motion.wasm").out
    w, h = 64, 48
    worker = WorkerProcess("motion", wasm.read_bytes(), HEADER.size + w * h,
                           load_message("motion.wasm", "", memory_budget_bytes=64 << 20))
    try:
        frame = np.zeros((1, w * h), np.uint8)
        reply = worker.process(pack_header(1, w * h, 10.0, 0, sample_format=2, width=w, height=h), frame, 5.0)
        maps = Path(f"/proc/{worker.pid}/maps").read_text()
    finally:
        worker.stop()
    assert reply["rc"] == 0
    libs = set(re.findall(r"(\S+/cv2/cv2\S*\.so)", maps))
    assert libs == {str(Path(cv2.__file__).parent / Path(next(iter(libs))).name)}, (libs, cv2.__file__)


def test_the_camera_tests_pass_under_opencv_4_too():
    require(OVERLAY / "cv2", "the OpenCV 4 overlay (make test installs it from requirements/opencv4.txt)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(OVERLAY), os.environ.get("PYTHONPATH")])),
               AP_EXPECT_OPENCV_MAJOR="4")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *UNDER_BOTH],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # Every one ran and passed (a test run on both engines counts twice): none skipped or missing.
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed[1]) >= len(UNDER_BOTH) and "skipped" not in proc.stdout \
        and "deselected" not in proc.stdout, proc.stdout[-2000:]
