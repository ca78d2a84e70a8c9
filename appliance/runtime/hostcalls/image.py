"""ap.img_*: OpenCV kernels (hal/drivers/camera/kernels.py) on views of the module's linear
memory (modules/ABI.md, "Host image kernels")."""
from __future__ import annotations

from appliance.runtime.hostcalls.dsp import keep_heap, one_thread_libraries


class HostImage:
    """Native kernels for ap.img_* (modules/ABI.md, "Host image kernels"): OpenCV through
    hal/drivers/camera/kernels.py on numpy views of the module's linear memory, in place like HostDsp. Every
    pointer, size and argument is checked first (AbiViolation); the C twins are in ap_image.h."""

    IMPORTS = ("img_downscale", "img_blur", "img_bg_subtract", "img_dilate", "img_blobs")
    MAX_SIDE = 16384
    MAX_PIXELS = 1 << 24
    MAX_BLOBS_OUT = 4096

    def __init__(self, memory, violation) -> None:
        one_thread_libraries()
        import numpy as np
        from hal.drivers.camera import kernels as imaging   # OpenCV: only in workers whose module uses these
        imaging.configure(threads=1)   # both once per process: a worker inherits them from the zygote
        imaging.warm_up()
        self.np, self.memory, self.violation = np, memory, violation
        self.kernels = imaging.ImageKernels()
        self.blur_kernels = imaging.BLUR_KERNELS
        self.alpha_one = imaging.ALPHA_ONE
        keep_heap()

    def _size(self, what: str, w: int, h: int) -> None:
        if not (1 <= w <= self.MAX_SIDE and 1 <= h <= self.MAX_SIDE and w * h <= self.MAX_PIXELS):
            raise self.violation(f"{what}: image {w}x{h} (1..{self.MAX_SIDE} each, at most {self.MAX_PIXELS} pixels)")

    def _u8(self, what: str, mem, ptr: int, nbytes: int, shape: tuple | None = None):
        if ptr < 0 or nbytes < 0 or ptr + nbytes > len(mem):
            raise self.violation(f"{what}: pointer {ptr}+{nbytes} is outside linear memory ({len(mem)} bytes)")
        a = self.np.frombuffer(mem, self.np.uint8, nbytes, ptr)
        return a.reshape(shape) if shape else a

    def downscale(self, src: int, w: int, h: int, factor: int, dst: int) -> int:
        what = "ap.img_downscale"
        self._size(what, w, h)
        if not (1 <= factor <= 16 and factor <= w and factor <= h):
            raise self.violation(f"{what}: factor={factor} (1..16, at most the width {w} and height {h})")
        mem = self.memory()
        ow, oh = w // factor, h // factor
        self.kernels.downscale(self._u8(what, mem, src, w * h, (h, w)), factor,
                               self._u8(what, mem, dst, ow * oh, (oh, ow)))
        return 0

    def blur(self, src: int, dst: int, w: int, h: int, kernel: int) -> int:
        what = "ap.img_blur"
        self._size(what, w, h)
        if kernel not in self.blur_kernels:
            raise self.violation(f"{what}: kernel={kernel} (1 box, 3 or 5 binomial)")
        mem = self.memory()
        self.kernels.blur(self._u8(what, mem, src, w * h, (h, w)), self._u8(what, mem, dst, w * h, (h, w)), kernel)
        return 0

    def bg_subtract(self, frame: int, bg: int, valid: int, mask: int, n: int, threshold: int, alpha: int) -> int:
        what = "ap.img_bg_subtract"
        if not 1 <= n <= self.MAX_PIXELS or not 0 <= threshold <= 255 or not 0 <= alpha <= self.alpha_one:
            raise self.violation(f"{what}: n={n}, threshold={threshold}, alpha={alpha} (n 1..{self.MAX_PIXELS}, "
                                 f"threshold 0..255, alpha 0..{self.alpha_one})")
        mem = self.memory()
        bg_view = self._u8(what, mem, bg, 2 * n).view(self.np.uint16)
        return self.kernels.bg_subtract(self._u8(what, mem, frame, n), bg_view, self._u8(what, mem, valid, n),
                                        self._u8(what, mem, mask, n), threshold, alpha)

    def dilate(self, src: int, dst: int, w: int, h: int, iterations: int) -> int:
        what = "ap.img_dilate"
        self._size(what, w, h)
        if not 0 <= iterations <= 16:
            raise self.violation(f"{what}: iterations={iterations} (0..16)")
        mem = self.memory()
        self.kernels.dilate(self._u8(what, mem, src, w * h, (h, w)), self._u8(what, mem, dst, w * h, (h, w)),
                            iterations)
        return 0

    def blobs(self, mask: int, w: int, h: int, min_area: int, out: int, max_out: int) -> int:
        what = "ap.img_blobs"
        self._size(what, w, h)
        if min_area < 1 or not 0 <= max_out <= self.MAX_BLOBS_OUT:
            raise self.violation(f"{what}: min_area={min_area}, max_out={max_out} (min_area >= 1, "
                                 f"max_out 0..{self.MAX_BLOBS_OUT})")
        mem = self.memory()
        image = self._u8(what, mem, mask, w * h, (h, w))
        out_view = self._u8(what, mem, out, 20 * max_out)
        count, rows = self.kernels.blobs(image, min_area, max_out)
        out_view[:rows.nbytes] = rows.view(self.np.uint8).ravel()
        return count

    def imports(self) -> dict:
        return {("ap", name): getattr(self, name[4:]) for name in self.IMPORTS}
