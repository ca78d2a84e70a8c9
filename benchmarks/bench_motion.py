"""The camera motion module (modules/src/motion) at 640x480 gray input, frames per CPU-second on one core:

  wasm3            the module in a worker, its own C kernels (host_dsp: false)
  wasm3 + host     the module in a worker, the per-pixel kernels by the host (ap.img_*: OpenCV and
                   numpy on the module's memory)
  wasmtime, wasmtime + host   the same on wasmtime, running motion.simd.wasm (docs/engines.md)
  native C         motion.c with gcc -O2, its own C kernels, the same frames and params (one process)

CPU of both processes (the supervisor side that sends the frames and the worker) is counted, as
in bench_bearing.py. Frames: vtest.avi resized to 640x480 when ../shared/data/video has it, else a
synthetic scene (moving objects on a textured background). Default params: scale 2 (the module
works on 320x240), gauss5 blur, 2 dilation passes.

Then each kernel alone on one such frame (C in wasm3 against the host twin), the profile that
decided which kernels the host offers.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance_tools.modbuild import build_module  # noqa: E402
from common import cpu_of, native_rate, self_cpu  # noqa: E402
from appliance.runtime.wire import HEADER, load_message, pack_header  # noqa: E402
from appliance.runtime.process import WorkerProcess  # noqa: E402

W, H = 640, 480
VIDEO = REPO.parent / "shared" / "data" / "video" / "vtest.avi"

KERNELS_C = r"""
#define AP_WINDOW_BYTES (64 + 1024)
#include "ap_module.h"
#include "ap_image.h"
static uint8_t buf[4 << 20] __attribute__((aligned(16)));
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
AP_EXPORT(t_blobs) int32_t t_blobs(const uint8_t *m, int32_t w, int32_t h, int32_t a, ap_blob *o, int32_t n) {
    return ap_img_blobs(m, w, h, a, o, n);
}
int32_t ap_init(const char *params, int32_t len) { ap_image_init(params, len); return 0; }
int32_t ap_process(const uint8_t *window, int32_t len) { (void)window; (void)len; return 0; }
"""




def load_frames(count: int = 100) -> tuple[list[np.ndarray], str]:
    import cv2
    frames = []
    if VIDEO.exists():
        cap = cv2.VideoCapture(str(VIDEO))
        while len(frames) < count:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(cv2.resize(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), (W, H), interpolation=cv2.INTER_AREA))
        cap.release()
        if len(frames) == count:
            return frames, f"{VIDEO.name} resized to {W}x{H}"
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:H, 0:W]
    base = (96 + 32 * np.sin(x / 7.0) * np.cos(y / 11.0)).astype(np.float32)
    frames = []
    for i in range(count):
        f = base + rng.normal(0, 2.0, base.shape)
        for speed, row in ((9, 150), (-6, 320)):
            cx = (i * speed) % (W + 60) - 30
            f[row:row + 90, max(cx, 0):max(cx + 40, 0)] = 220
        frames.append(np.clip(f, 0, 255).astype(np.uint8))
    return frames, f"synthetic {W}x{H} scene ({VIDEO} not found)"


def worker_rate(wasm: bytes, frames: list[np.ndarray], host_dsp: bool, n: int, engine: str = "wasm3",
                simd: bool = False) -> tuple[float, float]:
    """Frames per CPU-second (both processes) and the share of that CPU spent in the worker."""
    worker = WorkerProcess("bench", wasm, HEADER.size + W * H,
                           load_message("motion.wasm", f"host.dsp={int(host_dsp)}\nhost.features=1\n",
                                                     backend=engine, simd=simd))
    try:
        def run(count, first):
            for seq in range(first, first + count):
                header = pack_header(1, W * H, 10.0, seq, start_ns=seq * 100_000_000, sample_format=2, width=W,
                                     height=H)
                assert worker.process(header, frames[seq % len(frames)].reshape(1, -1), 30.0)["rc"] == 0
        run(10, 0)                                   # the background is seeded, buffers allocated
        cpu0, wcpu0 = self_cpu(), cpu_of(worker.pid)
        run(n, 10)
        own, wcpu = self_cpu() - cpu0, cpu_of(worker.pid) - wcpu0
    finally:
        worker.stop()
    return n / (own + wcpu), wcpu / (own + wcpu)


def kernel_profile(frames: list[np.ndarray], tmp: Path) -> list[tuple[str, float, float]]:
    """ms per call of each kernel on the C path (wasm3) and the host path, at the default params."""
    import wasm3

    from appliance.runtime.engines import IMPORT_SIGNATURES
    from appliance.runtime.hostcalls.abi import AbiViolation
    from appliance.runtime.hostcalls.image import HostImage

    src = tmp / "kernels"
    src.mkdir()
    (src / "kernels.c").write_text(KERNELS_C)
    (src / "module.yaml").write_text("name: kernels\nversion: 0.0.1\ndescription: bench\nmemory_kb: 16384\n"
                                     "stack_kb: 64\n")
    wasm = build_module(src, tmp / "kernels.wasm").out.read_bytes()
    env = wasm3.Environment()
    rt = env.new_runtime(64 << 10)
    mod = env.parse_module(wasm)
    rt.load(mod)

    def mem():
        return rt.get_memory(0)

    for (m, name), fn in HostImage(mem, AbiViolation).imports().items():
        mod.link_function(m, name, IMPORT_SIGNATURES[(m, name)], fn)
    mod.link_function("ap", "log", "v(iii)", lambda *a: None)

    def call(name, *args):
        return rt.find_function(name)(*args)

    buf = call("t_buf")

    def put(off, a):
        data = np.ascontiguousarray(a).tobytes()
        mem()[buf + off:buf + off + len(data)] = data
        return buf + off

    sw, sh, n = W // 2, H // 2, (W // 2) * (H // 2)
    frame, small, blur, bg, valid, mask, dil, out = (buf + i * 400_000 for i in range(8))
    put(valid - buf, np.full(n, 255, np.uint8))
    rows = []

    def timed(label, name, *args, reps=20, setup=None):
        ms = []
        for host in (0, 1):
            call("t_host", host)
            total = 0.0
            for _ in range(reps):
                if setup:
                    setup()
                t0 = time.perf_counter()
                call(name, *args)
                total += time.perf_counter() - t0
            ms.append(total / reps * 1e3)
        rows.append((label, *ms))

    put(frame - buf, frames[0])
    call("t_host", 1)
    call("t_downscale", frame, W, H, 2, small)
    call("t_blur", small, blur, sw, sh, 5)
    bg0 = (np.frombuffer(mem(), np.uint8, n, blur).astype(np.uint16) << 8).copy()
    put(frame - buf, frames[5])
    call("t_downscale", frame, W, H, 2, small)
    call("t_blur", small, blur, sw, sh, 5)
    timed(f"downscale {W}x{H} /2", "t_downscale", frame, W, H, 2, small)
    timed(f"blur gauss5 {sw}x{sh}", "t_blur", small, blur, sw, sh, 5)
    timed("bg_subtract", "t_bg_subtract", blur, bg, valid, mask, n, 25, 123,
          setup=lambda: put(bg - buf, bg0))
    timed("dilate x2", "t_dilate", mask, dil, sw, sh, 2)
    timed("blobs", "t_blobs", dil, sw, sh, 50, out, 8)
    return rows


def main() -> None:
    frames, what = load_frames()
    with tempfile.TemporaryDirectory() as tmp:
        src = REPO / "modules" / "src" / "motion"
        wasm = build_module(src, Path(tmp) / "motion.wasm").out.read_bytes()
        simd = build_module(src, Path(tmp) / "motion.simd.wasm", simd=True).out.read_bytes()
        c, c_share = worker_rate(wasm, frames, False, 150)
        host, host_share = worker_rate(wasm, frames, True, 1500)
        wt_c, _ = worker_rate(simd, frames, False, 1500, engine="wasmtime", simd=True)
        wt_host, _ = worker_rate(simd, frames, True, 1500, engine="wasmtime", simd=True)
        native = native_rate([src / "motion.c"], "host.dsp=0\nhost.features=1\n", [f.reshape(1, -1) for f in frames], 10.0,
                             warmup=10, count=1500, image=(W, H)).get("samples_per_cpu_s")
        native = native / (W * H) if native else None
        profile = kernel_profile(frames, Path(tmp))
    print(f"\nmotion: {W}x{H} gray frames ({what}), default params (scale 2, gauss5, dilate 2); "
          f"frames per CPU-second, one core, both processes counted (native: its one process)")
    print(f"{'wasm3 C kernels':>16} {'wasm3+host':>11} {'host/C':>7}   {'worker share (C, host)':>22}   "
          f"{'wasmtime C':>10} {'wasmtime+host':>13} {'native C':>9} {'wasmtime C/native':>17}")
    nat = f"{native:>9.0f}" if native else f"{'-':>9}"
    ratio = f"{wt_c / native:>16.2f}x" if native else f"{'-':>17}"
    print(f"{c:>16.0f} {host:>11.0f} {host / c:>6.1f}x   {c_share:>10.0%} {host_share:>10.0%}   "
          f"{wt_c:>10.0f} {wt_host:>13.0f} {nat} {ratio}")
    print("target (issue 5): >= 60 fps per core with host imports; (issue 19): wasmtime C >= 0.5x native C")
    print(f"\nper kernel, ms per call ({W}x{H} in, {W // 2}x{H // 2} after the downscale)")
    print(f"{'kernel':<24} {'C (wasm3)':>10} {'host':>8} {'C/host':>7}")
    for label, cms, hms in profile:
        print(f"{label:<24} {cms:>10.3f} {hms:>8.3f} {cms / hms:>6.0f}x")
    print(f"{'sum':<24} {sum(r[1] for r in profile):>10.3f} {sum(r[2] for r in profile):>8.3f}")


if __name__ == "__main__":
    main()
