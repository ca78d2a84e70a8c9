"""The camera motion module (modules/src/motion) and its image kernels (modules/sdk/ap_image.h,
host twins in appliance/runtime/worker.py HostImage and hal/drivers/camera/kernels.py).

- Each kernel's C fallback against its host twin on the same bytes in the same linear memory: the
  kernels are integer-exact, so the two paths must give identical bytes (no tolerance), and the
  host's results against independent numpy formulas.
- Bounds and argument checks: a bad pointer or size is an ABI fault through a real worker.
- The module through a real worker on synthetic scenes (an object crossing, a lighting change,
  masks, zones), and on real frames with both paths (identical features and events).
- The evaluation (`appliance eval motion`) through the real pipeline: frame agreement with MOG2.
"""
from __future__ import annotations

import numpy as np
import pytest

from appliance_tools.modbuild import build_module
from appliance.runtime.engines import IMPORT_SIGNATURES
from appliance.runtime.wire import HEADER, load_message, pack_header
from appliance.runtime.process import ModuleFault, WorkerProcess
from appliance.runtime.hostcalls.abi import AbiViolation
from appliance.runtime.hostcalls.image import HostImage

from conftest import REPO, shared_file
from support import build_inline_module, wait_for, write_config

KERNELS_C = r"""
#define AP_WINDOW_BYTES (64 + 1024)
#include "ap_module.h"
#include "ap_image.h"

static uint8_t buf[6 << 20] __attribute__((aligned(16)));   /* the test's scratch at t_buf() */

AP_EXPORT(t_buf) uint8_t *t_buf(void) { return buf; }
AP_EXPORT(t_host) void t_host(int32_t on) { ap_img_use_host = on; }
AP_EXPORT(t_downscale) int32_t t_downscale(const uint8_t *s, int32_t w, int32_t h, int32_t f, uint8_t *d) {
    return ap_img_downscale(s, w, h, f, d);
}
AP_EXPORT(t_blur) int32_t t_blur(const uint8_t *s, uint8_t *d, int32_t w, int32_t h, int32_t k) {
    return ap_img_blur(s, d, w, h, k);
}
AP_EXPORT(t_bg_subtract) int32_t t_bg_subtract(const uint8_t *f, uint16_t *bg, const uint8_t *v, uint8_t *m,
                                               int32_t n, int32_t thr, int32_t a) {
    return ap_img_bg_subtract(f, bg, v, m, n, thr, a);
}
AP_EXPORT(t_dilate) int32_t t_dilate(const uint8_t *s, uint8_t *d, int32_t w, int32_t h, int32_t it) {
    return ap_img_dilate(s, d, w, h, it);
}
AP_EXPORT(t_blobs) int32_t t_blobs(const uint8_t *m, int32_t w, int32_t h, int32_t min_area, ap_blob *out,
                                   int32_t max_out) {
    return ap_img_blobs(m, w, h, min_area, out, max_out);
}

/* In a worker: ap_process calls the kernel the `case` param names with arguments that break it. */
static int32_t which;

int32_t ap_init(const char *params, int32_t len) {
    ap_image_init(params, len);
    which = (int32_t)ap_param_f64(params, len, "case", 0, 0);
    return 0;
}

int32_t ap_process(const uint8_t *window, int32_t len) {
    (void)window; (void)len;
    const uint8_t *far = (const uint8_t *)0x7ffffff0;
    ap_blob *blobs = (ap_blob *)(buf + (4 << 20));
    switch (which) {
        case 1: return ap_img_downscale(far, 64, 64, 2, buf);
        case 2: return ap_img_downscale(buf, 64, 64, 0, buf + 65536);
        case 3: return ap_img_blur(buf, buf + 65536, 64, 64, 4);
        case 4: return ap_img_blur(buf, (uint8_t *)far, 64, 64, 5);
        case 5: return ap_img_bg_subtract(buf, (uint16_t *)far, buf, buf, 4096, 25, 100);
        case 6: return ap_img_bg_subtract(buf, (uint16_t *)(buf + 65536), buf, buf, 4096, 25, 5000);
        case 7: return ap_img_dilate(buf, buf + 65536, 64, 64, 17);
        case 8: return ap_img_dilate(buf, buf + 65536, 0, 10, 1);
        case 9: return ap_img_blobs(buf, 64, 64, 1, (ap_blob *)far, 8);
        case 10: return ap_img_blobs(buf, 64, 64, 1, blobs, 5000);
        case 11: return ap_img_blobs(buf, 20000, 10, 1, blobs, 8);
        case 12: return ap_img_bg_subtract(buf, (uint16_t *)(buf + 65536), buf, buf, 4096, 256, 100);
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def kernels_wasm(tmp_path_factory) -> bytes:
    return build_inline_module(tmp_path_factory, "imgkernels", KERNELS_C, memory_kb=16384)


@pytest.fixture(scope="module")
def motion_wasm(tmp_path_factory) -> bytes:
    result = build_module(REPO / "modules" / "src" / "motion", tmp_path_factory.mktemp("motion") / "motion.wasm")
    assert result.ok, result.problems
    return result.out.read_bytes()


class Kernels:
    """The kernel test module under wasm3 with the worker's HostImage linked in."""

    def __init__(self, wasm: bytes):
        import wasm3
        self.env = wasm3.Environment()
        self.rt = self.env.new_runtime(64 << 10)
        self.mod = self.env.parse_module(wasm)
        self.rt.load(self.mod)
        for (module, name), fn in HostImage(self.mem, AbiViolation).imports().items():
            self.mod.link_function(module, name, IMPORT_SIGNATURES[(module, name)], fn)
        self.mod.link_function("ap", "log", "v(iii)", lambda level, ptr, n: None)
        self.buf = self.call("t_buf")

    def call(self, name: str, *args):
        return self.rt.find_function(name)(*args)

    def mem(self) -> memoryview:
        return self.rt.get_memory(0)

    def put(self, offset: int, array) -> int:
        data = np.ascontiguousarray(array).tobytes()
        self.mem()[self.buf + offset:self.buf + offset + len(data)] = data
        return self.buf + offset

    def get(self, address: int, dtype, count: int) -> np.ndarray:
        return np.frombuffer(self.mem(), dtype, count, address).copy()

    def both(self, name: str, args: list, reset=None):
        """Runs t_<name> on the C path, then the host path (reset() before each); their return codes."""
        rcs = []
        for host in (0, 1):
            if reset:
                reset()
            self.call("t_host", host)
            rcs.append(self.call(f"t_{name}", *args))
        return rcs


@pytest.fixture(scope="module")
def k(kernels_wasm) -> Kernels:
    return Kernels(kernels_wasm)


A, B, C, D, E = 0, 1 << 20, 2 << 20, 3 << 20, 4 << 20      # byte offsets in the test's scratch


def images(w: int, h: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    return {"noise": rng.integers(0, 256, (h, w), dtype=np.uint8),
            "ramp": ((x * 7 + y * 3) % 256).astype(np.uint8),
            "flat": np.full((h, w), 101, np.uint8),
            "ties": rng.integers(100, 103, (h, w), dtype=np.uint8)}


def run_paths(k: Kernels, name: str, args: list, out_offset: int, out_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    outs = []
    for host in (0, 1):
        k.call("t_host", host)
        k.put(out_offset, np.full(out_bytes, 0xAB, np.uint8))   # sentinel: what a kernel leaves alone stays
        assert k.call(f"t_{name}", *args) == 0
        outs.append(k.get(k.buf + out_offset, np.uint8, out_bytes))
    return outs[0], outs[1]


# ---- downscale ------------------------------------------------------------------------------------

@pytest.mark.parametrize("w,h,f", [(640, 480, 2), (641, 479, 2), (384, 288, 3), (100, 61, 4), (64, 48, 5),
                                   (77, 50, 7), (640, 480, 16), (5, 5, 5), (9, 1, 1), (33, 2, 2)])
def test_downscale_host_matches_c_and_the_formula(k, w, h, f):
    ow, oh = w // f, h // f
    for kind, img in images(w, h, w * h + f).items():
        src = k.put(A, img)
        c, host = run_paths(k, "downscale", [src, w, h, f, k.buf + B], B, ow * oh + 16)
        assert np.array_equal(c, host), (kind, np.argwhere(c != host)[:5])
        assert (c[ow * oh:] == 0xAB).all()                         # nothing beyond dst written
        want = (img[:oh * f, :ow * f].reshape(oh, f, ow, f).astype(np.int64).sum(axis=(1, 3)) + f * f // 2) // (f * f)
        assert np.array_equal(c[:ow * oh].reshape(oh, ow), want), kind


# ---- blur -----------------------------------------------------------------------------------------

def blur_formula(img: np.ndarray, kernel: int) -> np.ndarray:
    taps = {1: [1, 1, 1], 3: [1, 2, 1], 5: [1, 4, 6, 4, 1]}[kernel]
    r = len(taps) // 2
    p = np.pad(img.astype(np.int64), r, mode="edge")
    h, w = img.shape
    acc = sum(taps[i] * taps[j] * p[i:i + h, j:j + w] for i in range(len(taps)) for j in range(len(taps)))
    total = sum(taps) ** 2
    return ((acc + total // 2) // total).astype(np.uint8)


@pytest.mark.parametrize("w,h", [(320, 240), (191, 143), (1, 1), (2, 7), (7, 2), (5, 3), (1, 40), (40, 1)])
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_blur_host_matches_c_and_the_formula(k, w, h, kernel):
    for kind, img in images(w, h, w + h + kernel).items():
        src = k.put(A, img)
        c, host = run_paths(k, "blur", [src, k.buf + B, w, h, kernel], B, w * h + 16)
        assert np.array_equal(c, host), (kind, np.argwhere(c != host)[:5])
        assert np.array_equal(c[:w * h].reshape(h, w), blur_formula(img, kernel)), kind
        assert (c[w * h:] == 0xAB).all()


@pytest.mark.parametrize("name,args", [("blur", [5]), ("dilate", [2])])
def test_blur_and_dilate_may_work_in_place(k, name, args):
    w, h = 160, 120
    img = images(w, h, 5)["noise"]
    if name == "dilate":
        img = np.where(img > 240, 255, 0).astype(np.uint8)
    results = []
    for host in (0, 1):
        k.call("t_host", host)
        src = k.put(A, img)
        assert k.call(f"t_{name}", src, src, w, h, *args) == 0
        results.append(k.get(src, np.uint8, w * h))
        src = k.put(A, img)
        assert k.call(f"t_{name}", src, k.buf + B, w, h, *args) == 0
        results.append(k.get(k.buf + B, np.uint8, w * h))
    assert all(np.array_equal(results[0], r) for r in results[1:])


# ---- background subtraction ------------------------------------------------------------------------

def bg_formula(frame, bg, valid, threshold, alpha):
    d = (frame.astype(np.int64) << 8) - bg
    mask = np.where((np.abs(d) > threshold << 8) & (valid != 0), 255, 0).astype(np.uint8)
    return mask, (bg + ((d * alpha + 2048) >> 12)).astype(np.uint16), int((mask != 0).sum())


@pytest.mark.parametrize("alpha", [0, 1, 123, 2048, 4095, 4096])
@pytest.mark.parametrize("threshold", [0, 25, 255])
def test_bg_subtract_host_matches_c_and_the_formula(k, alpha, threshold):
    n = 320 * 240
    rng = np.random.default_rng(alpha * 7 + threshold)
    frame = rng.integers(0, 256, n, dtype=np.uint8)
    bg = rng.integers(0, 255 * 256 + 1, n, dtype=np.uint16)
    bg[:100] = frame[:100].astype(np.uint16) << 8                  # exactly the background
    bg[100:200] = (frame[100:200].astype(np.uint16) << 8) + (threshold << 8)   # right at the threshold
    valid = np.where(rng.random(n) < 0.8, 255, 0).astype(np.uint8)
    valid[:50] = 1                                                  # any nonzero counts as valid
    outs = []
    for host in (0, 1):
        k.put(A, frame), k.put(B, bg), k.put(C, valid), k.put(D, np.full(n, 7, np.uint8))
        k.call("t_host", host)
        count = k.call("t_bg_subtract", k.buf + A, k.buf + B, k.buf + C, k.buf + D, n, threshold, alpha)
        outs.append((count, k.get(k.buf + D, np.uint8, n), k.get(k.buf + B, np.uint16, n)))
    want_mask, want_bg, want_count = bg_formula(frame, bg, valid, threshold, alpha)
    for count, mask, new_bg in outs:
        assert count == want_count
        assert np.array_equal(mask, want_mask)
        assert np.array_equal(new_bg, want_bg)
    if alpha == 4096:
        assert np.array_equal(outs[0][2], frame.astype(np.uint16) << 8)   # 4096 re-seeds


def test_bg_subtract_mask_may_be_the_frame(k):
    n = 5000
    rng = np.random.default_rng(9)
    frame = rng.integers(0, 256, n, dtype=np.uint8)
    bg = rng.integers(0, 255 * 256 + 1, n, dtype=np.uint16)
    valid = np.full(n, 255, np.uint8)
    results = []
    for host in (0, 1):
        k.put(A, frame), k.put(B, bg), k.put(C, valid)
        k.call("t_host", host)
        count = k.call("t_bg_subtract", k.buf + A, k.buf + B, k.buf + C, k.buf + A, n, 30, 200)
        results.append((count, k.get(k.buf + A, np.uint8, n), k.get(k.buf + B, np.uint16, n)))
    want_mask, want_bg, want_count = bg_formula(frame, bg, valid, 30, 200)
    for count, mask, new_bg in results:
        assert count == want_count and np.array_equal(mask, want_mask) and np.array_equal(new_bg, want_bg)


# ---- dilation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("w,h", [(320, 240), (13, 7), (1, 1), (1, 9), (9, 1), (6, 6)])
@pytest.mark.parametrize("iterations", [0, 1, 2, 3, 16])
def test_dilate_host_matches_c_and_opencv(k, w, h, iterations):
    import cv2
    rng = np.random.default_rng(w * 31 + h + iterations)
    for density in (0.002, 0.05, 0.5):
        img = np.where(rng.random((h, w)) < density, rng.integers(1, 256, (h, w)), 0).astype(np.uint8)
        src = k.put(A, img)
        c, host = run_paths(k, "dilate", [src, k.buf + B, w, h, iterations], B, w * h + 16)
        assert np.array_equal(c, host), (density, np.argwhere(c != host)[:5])
        binary = np.where(img != 0, 255, 0).astype(np.uint8)
        want = cv2.dilate(binary, np.ones((3, 3), np.uint8), iterations=iterations) if iterations else binary
        assert np.array_equal(c[:w * h].reshape(h, w), want), density
        assert (c[w * h:] == 0xAB).all()


# ---- blobs ------------------------------------------------------------------------------------------

def blob_rows(k: Kernels, address: int, count: int) -> list[tuple]:
    return [tuple(r) for r in k.get(address, np.int32, 5 * count).reshape(count, 5).tolist()]


def blobs_formula(img: np.ndarray, min_area: int) -> list[tuple]:
    import cv2
    _, _, stats, _ = cv2.connectedComponentsWithStats(img, connectivity=8, ltype=cv2.CV_32S)
    rows = [tuple(int(v) for v in s) for s in stats[1:] if s[4] >= min_area]
    return sorted(rows, key=lambda r: (-r[4], r[1], r[0], r[2], r[3]))


def blob_masks(w: int, h: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    ring = (np.hypot(x - w / 2, y - h / 2) // 6 % 2 == 0)
    return {"sparse": np.where(rng.random((h, w)) < 0.03, 255, 0).astype(np.uint8),
            "dense": np.where(rng.random((h, w)) < 0.45, 255, 0).astype(np.uint8),
            "rings": np.where(ring, 200, 0).astype(np.uint8),
            "dots": np.where((x % 2 == 0) & (y % 2 == 0), 1, 0).astype(np.uint8),     # most blobs possible
            "stripes": np.where(x % 2 == 0, 255, 0).astype(np.uint8),                # most runs possible
            "zigzag": np.where((x + y) % 2 == 0, 255, 0).astype(np.uint8)}            # all one blob (diagonals)


@pytest.mark.parametrize("w,h", [(320, 240), (640, 480), (1, 50), (50, 1), (3, 3)])
def test_blobs_host_matches_c_and_opencv(k, w, h):
    for kind, img in blob_masks(w, h, w + h).items():
        src = k.put(A, img)
        for min_area, max_out in ((1, 4096), (1, 8), (5, 3), (40, 8), (1, 0)):
            counts = []
            for host in (0, 1):
                k.call("t_host", host)
                k.put(B, np.full(20 * max_out + 20, 0xAB, np.uint8))
                count = k.call("t_blobs", src, w, h, min_area, k.buf + B, max_out)
                shown = min(count, max_out)
                counts.append((count, blob_rows(k, k.buf + B, shown)))
                assert (k.get(k.buf + B + 20 * shown, np.uint8, 20) == 0xAB).all()   # nothing beyond
            assert counts[0] == counts[1], (kind, min_area, max_out)
            want = blobs_formula(img, min_area)
            assert counts[0] == (len(want), want[:max_out]), (kind, min_area, max_out)


def test_c_kernels_refuse_images_beyond_their_scratch(k):
    k.call("t_host", 0)
    assert k.call("t_blur", k.buf + A, k.buf + B, 641, 480, 5) == -1
    assert k.call("t_dilate", k.buf + A, k.buf + B, 640, 481, 1) == -1
    assert k.call("t_blobs", k.buf + A, 1000, 1000, 1, k.buf + B, 8) == -1
    assert k.call("t_downscale", k.buf + A, 64, 64, 17, k.buf + B) == -1
    assert k.call("t_bg_subtract", k.buf + A, k.buf + B, k.buf + C, k.buf + D, 100, 25, 4097) == -1


# ---- bounds: an ABI fault through a real worker -------------------------------------------------------

@pytest.mark.parametrize("case,kernel,reason", [
    (1, "ap.img_downscale", "outside linear memory"),
    (2, "ap.img_downscale", "factor=0"),
    (3, "ap.img_blur", "kernel=4"),
    (4, "ap.img_blur", "outside linear memory"),
    (5, "ap.img_bg_subtract", "outside linear memory"),
    (6, "ap.img_bg_subtract", "alpha=5000"),
    (12, "ap.img_bg_subtract", "threshold=256"),
    (7, "ap.img_dilate", "iterations=17"),
    (8, "ap.img_dilate", "image 0x10"),
    (9, "ap.img_blobs", "outside linear memory"),
    (10, "ap.img_blobs", "max_out=5000"),
    (11, "ap.img_blobs", "image 20000x10"),
])
def test_image_kernel_abuse_is_an_abi_fault_in_the_worker(kernels_wasm, case, kernel, reason):
    worker = WorkerProcess("imgkernels", kernels_wasm, HEADER.size + 4 * 64,
                           load_message("imgkernels.wasm", f"case={case}\nhost.dsp=1\n"))
    try:
        with pytest.raises(ModuleFault) as info:
            worker.process(pack_header(1, 64, 1000.0, 0), np.zeros(64, np.float32), 5.0)
        assert info.value.kind == "abi", info.value.reason
        assert kernel in info.value.reason and reason in info.value.reason, info.value.reason
        assert worker.returncode is not None   # it exited after the fault, and was reaped
    finally:
        worker.kill()


def test_workers_share_the_zygotes_libraries(kernels_wasm, vibstats_wasm):
    """OpenCV and numpy are loaded once, in the zygote: a worker maps them, but its own (private)
    memory is a few MiB whether its module uses the image kernels or not."""
    for wasm in (kernels_wasm, vibstats_wasm.read_bytes()):
        worker = WorkerProcess("m", wasm, HEADER.size + 4 * 64, load_message("m.wasm", "host.dsp=1\n"))
        try:
            with open(f"/proc/{worker.pid}/maps") as f:
                assert "cv2" in f.read()
            with open(f"/proc/{worker.pid}/smaps_rollup") as f:
                rollup = {line.split(":")[0]: int(line.split()[1]) for line in f if line.endswith("kB\n")}
            private = rollup["Private_Clean"] + rollup["Private_Dirty"]
            assert private < 32 << 10, rollup
        finally:
            worker.stop()


# ---- the module on synthetic scenes ---------------------------------------------------------------------

W, H = 320, 240


def background(seed: int = 0) -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    return (96 + 32 * np.sin(x / 7.0) * np.cos(y / 11.0)).astype(np.float32)


def scene(n: int, objects=lambda i: [], seed: int = 1, brighten=lambda i: 0) -> list[np.ndarray]:
    """n gray frames of a textured background with sensor noise (sigma 2); objects(i) lists
    (x, y, w, h) rectangles of gray 220 in frame i; brighten(i) adds that many gray levels."""
    rng = np.random.default_rng(seed)
    base = background()
    frames = []
    for i in range(n):
        f = base + rng.normal(0, 2.0, base.shape) + brighten(i)
        for x, y, w, h in objects(i):
            f[max(y, 0):y + h, max(x, 0):x + w] = 220 + brighten(i)
        frames.append(np.clip(f, 0, 255).astype(np.uint8))
    return frames


def run_module(wasm: bytes, frames: list[np.ndarray], params: dict | None = None, host_dsp: int = 1,
               fps: float = 10.0) -> list[dict]:
    h, w = frames[0].shape
    items = dict(params or {}, **{"host.dsp": host_dsp})
    text = "".join(f"{key}={value}\n" for key, value in sorted(items.items()))
    worker = WorkerProcess("motion", wasm, HEADER.size + w * h, load_message("motion.wasm", text))
    replies = []
    try:
        for i, frame in enumerate(frames):
            header = pack_header(1, w * h, fps, i, start_ns=int(i * 1e9 / fps), sample_format=2, width=w, height=h)
            reply = worker.process(header, frame.reshape(1, -1), 30.0)
            assert reply["rc"] == 0, reply
            replies.append(reply)
    finally:
        worker.stop()
    return replies


def crossing(i: int, start: int = 30, speed: int = 8) -> list[tuple[int, int, int, int]]:
    """A person-sized rectangle (24 x 60) crossing the frame left to right from frame `start`."""
    x = -24 + (i - start) * speed
    return [(x, 100, 24, 60)] if start <= i and x < W else []


@pytest.mark.parametrize("host_dsp", [1, 0])
def test_an_object_crossing_is_one_event(motion_wasm, host_dsp):
    frames = scene(110, crossing)                      # in view from frame 30 to 72
    replies = run_module(motion_wasm, frames, host_dsp=host_dsp)
    events = [(i, e) for i, r in enumerate(replies) for e in r["e"]]
    assert [e[1][0] for e in events] == [1, 0], events     # one warning, one info
    (start, (_, _, start_msg)), (end, (_, _, end_msg)) = events
    motion = [i for i, r in enumerate(replies) if r["f"]["motion"]]
    assert motion[0] in (30, 31) and motion[-1] >= 70
    assert start == motion[0] + 1                          # start_frames = 2
    assert end == motion[-1] + 10                          # end_frames = 10
    assert start_msg.startswith("motion: 1 object, ") and start_msg.endswith("% of the frame changed")
    assert end_msg.startswith("motion ended after ") and "frames with motion" in end_msg
    seconds = float(end_msg.split("after ")[1].split(" s")[0])
    assert seconds == pytest.approx((motion[-1] - motion[0]) / 10, abs=0.05)
    # the box follows the object, in frame pixels (the module works at half resolution)
    for i in (40, 50, 60):
        f, (x, y, w, h) = replies[i]["f"], crossing(i)[0]
        assert f["boxes"] == 1 and f["changed_fraction"] > 0
        bx, by, bw, bh = (f[f"box0.{c}"] for c in "xywh")
        assert abs(bx - max(x, 0)) <= 8 and abs(by - y) <= 8
        assert bx + bw >= min(x + w, W) and by + bh >= y + h
        assert bw <= w + 40 and bh <= h + 16               # the object plus its trail and the dilation
    assert all(not r["f"]["motion"] for r in replies[:30] + replies[85:])


@pytest.mark.parametrize("persistent", [False, True])
def test_a_global_lighting_change_raises_no_event(motion_wasm, persistent):
    # frame 40 brightened by +60 (a flash), or every frame from 40 on (the lights went on)
    frames = scene(70, brighten=(lambda i: 60 * (i >= 40)) if persistent else (lambda i: 60 * (i == 40)))
    replies = run_module(motion_wasm, frames)
    assert not any(r["e"] for r in replies)
    assert not any(r["f"]["motion"] for r in replies)
    assert replies[40]["f"]["lighting"] == 1 and replies[40]["f"]["changed_fraction"] > 0.9
    assert sum(r["f"]["lighting"] for r in replies) == (1 if persistent else 2)   # the flash ends: once more


def test_lighting_change_during_motion_keeps_the_object_detected(motion_wasm):
    frames = scene(80, lambda i: crossing(i, 20, 4), brighten=lambda i: 60 * (i >= 40))
    replies = run_module(motion_wasm, frames)
    assert replies[40]["f"]["lighting"] == 1 and replies[40]["f"]["motion"] == 0
    assert all(r["f"]["motion"] for r in replies[43:70])   # the background re-seeded; the object moves on
    assert [e[0] for r in replies for e in r["e"]] == [1]  # one event, not ended by the flash


def test_masks_suppress_motion_inside_them(motion_wasm):
    frames = scene(100, crossing)
    everything = "0,0;320,0;320,240;0,240"
    replies = run_module(motion_wasm, frames, {"mask.all": everything})
    assert not any(r["e"] for r in replies) and not any(r["f"]["motion"] for r in replies)
    assert all(r["f"]["changed_fraction"] == 0 for r in replies)
    # a mask over the left half: the object moves there unseen, then is seen in the right half
    replies = run_module(motion_wasm, frames, {"mask.left": "0,0;160,0;160,240;0,240"})
    motion = [i for i, r in enumerate(replies) if r["f"]["motion"]]
    assert motion and crossing(motion[0])[0][0] + 24 > 150      # first seen when it reaches x = 160
    for i in motion:
        assert replies[i]["f"]["box0.x"] >= 156                 # no box reaches into the mask
    assert [e[0] for r in replies for e in r["e"]] == [1, 0]


def test_zones_name_where_the_motion_is(motion_wasm):
    frames = scene(100, crossing)
    params = {"zone.dock": "0,0;100,0;100,240;0,240", "zone.gate": "220,0;320,0;320,240;220,240",
              "zone.sky": "0,0;320,0;320,50;0,50"}
    replies = run_module(motion_wasm, frames, params)
    start = [r["e"][0] for r in replies if r["e"] and r["e"][0][0] == 1]
    assert start[0][2].startswith("motion in zone dock: 1 object, ")
    end = [e for r in replies for e in r["e"] if e[0] == 0]
    assert end and end[0][2].endswith("; zones dock, gate)")
    assert all(r["f"]["zone.sky"] == 0 for r in replies)
    in_gate = [i for i, r in enumerate(replies) if r["f"]["zone.gate"]]
    assert in_gate and all(crossing(i) and crossing(i)[0][0] + 24 + 8 >= 220 for i in in_gate)
    assert replies[50]["f"]["zone.dock"] == 0 and replies[50]["f"]["zone.gate"] == 0   # x = 136..160
    # no zones configured: no zone features; zones but motion elsewhere: said so
    assert not any(k.startswith("zone.") for k in run_module(motion_wasm, frames[:35])[34]["f"])
    replies = run_module(motion_wasm, frames, {"zone.sky": "0,0;320,0;320,50;0,50"})
    assert [e[2].split(":")[0] for r in replies for e in r["e"] if e[0] == 1] == ["motion outside the zones"]


def test_a_static_noisy_scene_is_quiet(motion_wasm):
    replies = run_module(motion_wasm, scene(60, seed=4))
    assert not any(r["e"] for r in replies) and not any(r["f"]["motion"] for r in replies)
    assert max(r["f"]["changed_fraction"] for r in replies) < 0.001


def test_params_are_checked(motion_wasm):
    for params, message in ((("treshold=20",), "unknown param 'treshold'"),
                            (("zone.dock=0,0;10,10",), "zone.dock must be a polygon of 3..64 points"),
                            (("mask.a=0,0;10,x;5,5",), "mask.a must be a polygon"),
                            (("zone.bad name=0,0;1,0;1,1",), "zone names may hold only"),
                            (("blur=median",), "blur must be none, box, gauss3 or gauss5"),
                            (("scale=0",), "scale must be a whole number from 1 to 16"),
                            (("alpha=0",), "alpha must be in (0, 1]"),
                            (("threshold=300",), "threshold must be"),
                            (("global_fraction=1.5",), "global_fraction must be in (0, 1]")):
        with pytest.raises(ModuleFault) as info:
            WorkerProcess("motion", motion_wasm, 1 << 16, load_message("motion.wasm", "\n".join(params) + "\n"))
        assert info.value.kind == "params" and message in info.value.reason, (params, info.value.reason)


def test_frames_too_large_after_the_scale_are_refused(motion_wasm):
    worker = WorkerProcess("motion", motion_wasm, HEADER.size + 1280 * 960,
                           load_message("motion.wasm", "scale=1\nhost.dsp=1\n"))
    try:
        reply = worker.process(pack_header(1, 1280 * 960, 10.0, 0, sample_format=2, width=1280, height=960),
                               np.zeros((1, 1280 * 960), np.uint8), 10.0)
        assert reply["rc"] < 0 and "raise scale" in reply["l"][0][1]
    finally:
        worker.stop()


def test_bgr_frames_are_taken_as_gray(motion_wasm):
    frames = scene(60, crossing)
    gray = run_module(motion_wasm, frames)
    h, w = frames[0].shape
    worker = WorkerProcess("motion", motion_wasm, HEADER.size + 3 * w * h, load_message("motion.wasm", "host.dsp=1\n"))
    try:
        for i, f in enumerate(frames):
            planes = np.stack([f, f, f]).reshape(3, -1)
            reply = worker.process(pack_header(3, w * h, 10.0, i, start_ns=i * 100_000_000, sample_format=2, width=w,
                                               height=h), planes, 10.0)
            assert reply["f"] == gray[i]["f"]
    finally:
        worker.stop()


# ---- both paths on real frames ---------------------------------------------------------------------------

def video_frames(size: tuple[int, int], count: int) -> list[np.ndarray]:
    import cv2
    cap = cv2.VideoCapture(str(shared_file("video", "vtest.avi")))
    frames = []
    try:
        while len(frames) < count:
            ok, frame = cap.read()
            assert ok
            frames.append(cv2.resize(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), size, interpolation=cv2.INTER_AREA))
    finally:
        cap.release()
    return frames


@pytest.mark.parametrize("size,count,params", [((384, 288), 160, {}), ((640, 480), 60, {}),
                                               ((640, 480), 40, {"scale": 3, "blur": "box", "dilate": 1}),
                                               ((384, 288), 40, {"scale": 4, "blur": "gauss3", "dilate": 0}),
                                               ((320, 240), 40, {"scale": 1, "blur": "none"})])
def test_host_and_c_paths_agree_on_real_frames(motion_wasm, size, count, params):
    """Integer-exact kernels: identical boxes, flags, fractions and events (no tolerance)."""
    frames = video_frames(size, count)
    params = dict(params, **{"zone.left": f"0,0;{size[0] // 2},0;{size[0] // 2},{size[1]};0,{size[1]}",
                             "mask.corner": "0,0;60,0;0,60"})
    host = run_module(motion_wasm, frames, params, host_dsp=1)
    c = run_module(motion_wasm, frames, params, host_dsp=0)
    assert [r["f"] for r in host] == [r["f"] for r in c]
    assert [r["e"] for r in host] == [r["e"] for r in c]
    assert sum(r["f"]["motion"] for r in host) > count // 2


# ---- YAML polygons through the real pipeline ------------------------------------------------------------

def test_simulated_camera_with_zones_from_yaml(tmp_path, motion_wasm):
    from appliance.core.supervisor import Supervisor
    wasm = tmp_path / "motion.wasm"
    wasm.write_bytes(motion_wasm)
    zone = [[0, 0], [160, 0], [160, 60], [0, 60]]             # the upper half: where the big object crosses
    cfg = write_config(tmp_path, {"cam": {"type": "camera", "simulate": True, "fps": 25, "resize": [160, 120]}},
                       {"motion": {"wasm": str(wasm), "source": "cam",
                                   "params": {"zone": {"top": zone},
                                              "mask": {"0": [[0, 100], [160, 100], [160, 120]]}}}})
    sup = Supervisor(cfg)
    seen, events = [], []
    host = sup.modules["motion"]
    sup.subscribe(lambda name, w, r: (seen.append(r.features), events.extend(r.events)) if name == host.name else None)
    sup.start()
    try:
        wait_for(lambda: any(e[0] == 1 for e in events), 20, "a motion event")
    finally:
        sup.stop()
    assert any(f.get("zone.top") == 1 for f in seen)
    assert "box0.x" in seen[-1] or not seen[-1]["motion"]


# ---- the evaluation --------------------------------------------------------------------------------------

REACHED_AGREEMENT = 1.0     # measured: 785 of 785 frames agree (docs/modules/motion.md)


def test_evaluation_reaches_its_documented_agreement():
    from appliance_tools.evaluation.motion import evaluate
    r = evaluate(shared_file("video", "vtest.avi"))
    assert r.frames == 795 and r.compared == 785
    assert r.agreement >= 0.95 and r.agreement >= REACHED_AGREEMENT - 0.01
    assert r.f1 >= 0.98 and r.object_recall >= 0.95
    assert len(r.events) == 1 and r.events[0].start <= 3   # people walk through the whole video: one event
