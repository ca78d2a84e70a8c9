/*
 * ap_image.h: image kernels for modules on uint8 gray frames, in plain C (freestanding wasm32).
 *
 * Downscale by an integer factor (box mean), 3x3 box / 3x3 and 5x5 binomial ("gaussian") blur,
 * a running-average background with absdiff + threshold, binary dilation and 8-connected blobs
 * (bounding boxes and areas). Each has a host-accelerated twin behind an optional import
 * (`ap.img_*`, OpenCV on the module's memory; see modules/ABI.md, "Host image kernels"): the
 * dispatchers below use the host when the host said so in the params (`host.dsp=1`, the same
 * switch as ap_dsp.h), and the C code here otherwise. Every kernel is defined in integers, so the
 * two paths give the same bytes (tested in tests/test_motion_module.py).
 *
 * Images are w x h bytes, row by row, no padding (stride = w). Sizes: 1 <= w, h <= 16384 and
 * w * h <= 2^24 for the host; the C kernels that need scratch (blur, dilate, blobs) also need
 * w * h <= AP_IMAGE_MAX_PIXELS (default 640 x 480) and return -1 beyond. All return < 0 on
 * invalid arguments (the host faults the module instead: kind "abi").
 *
 * Include after ap_module.h; call ap_image_init(params, len) in ap_init.
 */
#ifndef AP_IMAGE_H
#define AP_IMAGE_H

#include "ap_module.h"

#ifndef AP_IMAGE_MAX_PIXELS
#define AP_IMAGE_MAX_PIXELS (640 * 480)
#endif
#define AP_IMAGE_MAX_SIDE 16384
#define AP_IMAGE_ALPHA_ONE 4096          /* background learning rate: Q12 fixed point */

/* One 8-connected blob: bounding box (pixels of the image it was found in) and pixel count. */
typedef struct { int32_t x, y, w, h, area; } ap_blob;

/* ---- host imports (optional: only called when the host announced them) --------------------- */

AP_IMPORT(img_downscale) int32_t ap_host_img_downscale(const uint8_t *src, int32_t w, int32_t h, int32_t factor,
                                                      uint8_t *dst);
AP_IMPORT(img_blur) int32_t ap_host_img_blur(const uint8_t *src, uint8_t *dst, int32_t w, int32_t h, int32_t kernel);
AP_IMPORT(img_bg_subtract) int32_t ap_host_img_bg_subtract(const uint8_t *frame, uint16_t *bg, const uint8_t *valid,
                                                          uint8_t *mask, int32_t n, int32_t threshold,
                                                          int32_t alpha);
AP_IMPORT(img_dilate) int32_t ap_host_img_dilate(const uint8_t *src, uint8_t *dst, int32_t w, int32_t h,
                                                int32_t iterations);
AP_IMPORT(img_blobs) int32_t ap_host_img_blobs(const uint8_t *mask, int32_t w, int32_t h, int32_t min_area,
                                              ap_blob *out, int32_t max_out);

#if !defined(__wasm__)
/* Native builds (tests, benchmarks) never set host.dsp: stand-ins so they link. */
__attribute__((weak)) int32_t ap_host_img_downscale(const uint8_t *src, int32_t w, int32_t h, int32_t factor,
                                                    uint8_t *dst) {
    (void)src; (void)w; (void)h; (void)factor; (void)dst; return -1;
}
__attribute__((weak)) int32_t ap_host_img_blur(const uint8_t *src, uint8_t *dst, int32_t w, int32_t h, int32_t kernel) {
    (void)src; (void)dst; (void)w; (void)h; (void)kernel; return -1;
}
__attribute__((weak)) int32_t ap_host_img_bg_subtract(const uint8_t *frame, uint16_t *bg, const uint8_t *valid,
                                                      uint8_t *mask, int32_t n, int32_t threshold, int32_t alpha) {
    (void)frame; (void)bg; (void)valid; (void)mask; (void)n; (void)threshold; (void)alpha; return -1;
}
__attribute__((weak)) int32_t ap_host_img_dilate(const uint8_t *src, uint8_t *dst, int32_t w, int32_t h,
                                                 int32_t iterations) {
    (void)src; (void)dst; (void)w; (void)h; (void)iterations; return -1;
}
__attribute__((weak)) int32_t ap_host_img_blobs(const uint8_t *mask, int32_t w, int32_t h, int32_t min_area,
                                                ap_blob *out, int32_t max_out) {
    (void)mask; (void)w; (void)h; (void)min_area; (void)out; (void)max_out; return -1;
}
#endif

static int ap_img_use_host;   /* set by ap_image_init from the params (host.dsp) */

static inline void ap_image_init(const char *params, int32_t len) {
    ap_img_use_host = ap_param_f64(params, len, "host.dsp", 0, 0) != 0;
}

static inline int ap_img_size_ok(int32_t w, int32_t h) {
    return w >= 1 && h >= 1 && w <= AP_IMAGE_MAX_SIDE && h <= AP_IMAGE_MAX_SIDE && (int64_t)w * h <= (1 << 24);
}

/* Scratch of the C kernels: a uint16 plane (blur and dilate passes), and the runs of the blob
 * labelling. Runs per row <= ceil(w/2), so <= (P + h) / 2 in all; 8-connected blobs <= one per
 * 2x2 cell. */
#define AP_IMG_MAX_RUNS (AP_IMAGE_MAX_PIXELS / 2 + AP_IMAGE_MAX_SIDE)
#define AP_IMG_MAX_BLOBS (AP_IMAGE_MAX_PIXELS / 4 + AP_IMAGE_MAX_SIDE)
static uint16_t ap_img_tmp[AP_IMAGE_MAX_PIXELS];
static uint16_t ap_img_run_x0[AP_IMG_MAX_RUNS], ap_img_run_x1[AP_IMG_MAX_RUNS];
static int32_t ap_img_run_parent[AP_IMG_MAX_RUNS];
static ap_blob ap_img_blob_acc[AP_IMG_MAX_BLOBS];

/* ---- downscale: box mean of factor x factor blocks ------------------------------------------- */

/* dst[y][x] = (sum of the block + f*f/2) / (f*f) (round half up), dst (w/f) x (h/f) (floor: the
 * last w % f columns and h % f rows are left out). 1 <= f <= 16, f <= w, f <= h; dst and src apart. */
static int32_t ap_img_downscale_c(const uint8_t *src, int32_t w, int32_t h, int32_t f, uint8_t *dst) {
    if (!ap_img_size_ok(w, h) || f < 1 || f > 16 || f > w || f > h) return -1;
    int32_t ow = w / f, oh = h / f;
    uint32_t area = (uint32_t)(f * f), half = area / 2;
    if (f == 2) {
        for (int32_t y = 0; y < oh; y++) {
            const uint8_t *a = src + (size_t)(2 * y) * w, *b = a + w;
            uint8_t *o = dst + (size_t)y * ow;
            for (int32_t x = 0; x < ow; x++, a += 2, b += 2)
                o[x] = (uint8_t)(((uint32_t)a[0] + a[1] + b[0] + b[1] + 2) >> 2);
        }
        return 0;
    }
    for (int32_t y = 0; y < oh; y++) {
        for (int32_t x = 0; x < ow; x++) {
            uint32_t sum = 0;
            const uint8_t *p = src + (size_t)(y * f) * w + x * f;
            for (int32_t j = 0; j < f; j++, p += w)
                for (int32_t i = 0; i < f; i++) sum += p[i];
            dst[(size_t)y * ow + x] = (uint8_t)((sum + half) / area);
        }
    }
    return 0;
}

/* ---- blur: separable 3x3 box or binomial kernels, replicated border --------------------------- */

enum { AP_BLUR_BOX3 = 1, AP_BLUR_GAUSS3 = 3, AP_BLUR_GAUSS5 = 5 };

/* kernel 1: 3x3 box, (sum + 4) / 9; 3: [1 2 1] x [1 2 1], (sum + 8) >> 4; 5: [1 4 6 4 1] x
 * [1 4 6 4 1], (sum + 128) >> 8 (OpenCV's GaussianBlur with sigma 0 for 3 and 5, bit-exact).
 * Pixels beyond the border repeat the edge. dst may be src. */
static int32_t ap_img_blur_c(const uint8_t *src, uint8_t *dst, int32_t w, int32_t h, int32_t kernel) {
    if (!ap_img_size_ok(w, h) || (int64_t)w * h > AP_IMAGE_MAX_PIXELS) return -1;
    if (kernel != AP_BLUR_BOX3 && kernel != AP_BLUR_GAUSS3 && kernel != AP_BLUR_GAUSS5) return -1;
    uint16_t *t = ap_img_tmp;
    /* horizontal pass into t: the edges with clamped indices, the interior without */
    int32_t r = kernel == AP_BLUR_GAUSS5 ? 2 : 1;
    for (int32_t y = 0; y < h; y++) {
        const uint8_t *s = src + (size_t)y * w;
        uint16_t *o = t + (size_t)y * w;
        for (int32_t x = 0; x < w; x++) {
            if (x == r && x < w - r) {
                if (kernel == AP_BLUR_BOX3) {
                    for (; x < w - r; x++) o[x] = (uint16_t)(s[x - 1] + s[x] + s[x + 1]);
                } else if (kernel == AP_BLUR_GAUSS3) {
                    for (; x < w - r; x++) o[x] = (uint16_t)(s[x - 1] + 2 * s[x] + s[x + 1]);
                } else {
                    for (; x < w - r; x++)
                        o[x] = (uint16_t)(s[x - 2] + 4 * (s[x - 1] + s[x + 1]) + 6 * s[x] + s[x + 2]);
                }
                if (x >= w) break;
            }
            int32_t xm1 = x > 0 ? x - 1 : 0, xp1 = x < w - 1 ? x + 1 : w - 1;
            if (kernel == AP_BLUR_BOX3) {
                o[x] = (uint16_t)(s[xm1] + s[x] + s[xp1]);
            } else if (kernel == AP_BLUR_GAUSS3) {
                o[x] = (uint16_t)(s[xm1] + 2 * s[x] + s[xp1]);
            } else {
                int32_t xm2 = x > 1 ? x - 2 : 0, xp2 = x < w - 2 ? x + 2 : w - 1;
                o[x] = (uint16_t)(s[xm2] + 4 * (s[xm1] + s[xp1]) + 6 * s[x] + s[xp2]);
            }
        }
    }
    /* vertical pass from t into dst */
    for (int32_t y = 0; y < h; y++) {
        int32_t ym1 = y > 0 ? y - 1 : 0, yp1 = y < h - 1 ? y + 1 : h - 1;
        const uint16_t *a = t + (size_t)ym1 * w, *b = t + (size_t)y * w, *c = t + (size_t)yp1 * w;
        uint8_t *o = dst + (size_t)y * w;
        if (kernel == AP_BLUR_BOX3) {
            for (int32_t x = 0; x < w; x++) o[x] = (uint8_t)(((uint32_t)a[x] + b[x] + c[x] + 4) / 9);
        } else if (kernel == AP_BLUR_GAUSS3) {
            for (int32_t x = 0; x < w; x++) o[x] = (uint8_t)(((uint32_t)a[x] + 2u * b[x] + c[x] + 8) >> 4);
        } else {
            int32_t ym2 = y > 1 ? y - 2 : 0, yp2 = y < h - 2 ? y + 2 : h - 1;
            const uint16_t *a2 = t + (size_t)ym2 * w, *c2 = t + (size_t)yp2 * w;
            for (int32_t x = 0; x < w; x++)
                o[x] = (uint8_t)(((uint32_t)a2[x] + 4u * ((uint32_t)a[x] + c[x]) + 6u * b[x] + c2[x] + 128) >> 8);
        }
    }
    return 0;
}

/* ---- background: running average, absdiff and threshold ---------------------------------------- */

/* bg holds the background in 8.8 fixed point (gray level x 256). Per pixel i < n:
 *   d       = frame[i] * 256 - bg[i]
 *   mask[i] = 255 if valid[i] != 0 and |d| > threshold * 256, else 0
 *   bg[i]  += (d * alpha + 2048) >> 12       (alpha in Q12: 0..4096; 4096 re-seeds bg = frame)
 * Returns the number of pixels set in mask. 0 <= threshold <= 255. mask may be frame. */
static int32_t ap_img_bg_subtract_c(const uint8_t *frame, uint16_t *bg, const uint8_t *valid, uint8_t *mask,
                                    int32_t n, int32_t threshold, int32_t alpha) {
    if (n < 1 || n > (1 << 24) || threshold < 0 || threshold > 255 || alpha < 0 || alpha > AP_IMAGE_ALPHA_ONE)
        return -1;
    int32_t thr = threshold << 8, count = 0;
    for (int32_t i = 0; i < n; i++) {
        int32_t d = ((int32_t)frame[i] << 8) - (int32_t)bg[i];
        int32_t ad = d < 0 ? -d : d;
        int32_t on = (ad > thr) & (valid[i] != 0);
        mask[i] = (uint8_t)(on ? 255 : 0);
        count += on;
        bg[i] = (uint16_t)((int32_t)bg[i] + ((d * alpha + 2048) >> 12));
    }
    return count;
}

/* ---- dilation: binary, a square of (2k+1) x (2k+1) -------------------------------------------- */

static inline uint64_t ap_ld64(const uint8_t *p) { uint64_t v; __builtin_memcpy(&v, p, 8); return v; }
static inline void ap_st64(uint8_t *p, uint64_t v) { __builtin_memcpy(p, &v, 8); }

/* o[i] |= s[i] for n bytes of separate buffers: eight at a time in a 64-bit word (restrict: clang
 * runs it in vectors; gcc -O2 does not vectorise a loop of unknown count, the words still help). */
static inline void ap_or_bytes(uint8_t *restrict o, const uint8_t *restrict s, int32_t n) {
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) ap_st64(o + i, ap_ld64(o + i) | ap_ld64(s + i));
    for (; i < n; i++) o[i] |= s[i];
}

/* o[i] = o[i] ? 255 : 0 for n bytes, eight at a time (0xFF in each byte that is not 0). */
static inline void ap_nonzero_to_255(uint8_t *o, int32_t n) {
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const uint64_t v = ap_ld64(o + i), lo7 = 0x7f7f7f7f7f7f7f7full;
        ap_st64(o + i, (((((v & lo7) + lo7) | v) & ~lo7) >> 7) * 0xffu);
    }
    for (; i < n; i++) o[i] = o[i] ? 255 : 0;
}

/* dst = 255 where a pixel within k = `iterations` columns and rows (the image's own pixels only)
 * is not 0, else 0: k passes of a 3x3 binary dilation (OpenCV's dilate of the 0/255 mask, whose
 * border adds nothing). k = 0 gives dst = 255 where src != 0. 0 <= k <= 16; dst may be src.
 * Each pass is a loop over a whole row (OR of rows, shifted for the columns), not a loop over
 * the window per pixel: straight loops the compilers vectorise, and on wasmtime no per-pixel
 * loop head (where Cranelift reloads what the loop carries). */
static int32_t ap_img_dilate_c(const uint8_t *src, uint8_t *dst, int32_t w, int32_t h, int32_t iterations) {
    if (!ap_img_size_ok(w, h) || (int64_t)w * h > AP_IMAGE_MAX_PIXELS || iterations < 0 || iterations > 16)
        return -1;
    int32_t k = iterations;
    uint8_t *t = (uint8_t *)ap_img_tmp;
    for (int32_t y = 0; y < h; y++) {            /* rows: OR over x-k..x+k */
        const uint8_t *s = src + (size_t)y * w;
        uint8_t *o = t + (size_t)y * w;
        const int32_t inner = w - 2 * k;         /* pixels whose window lies inside the row: x in [k, w-k) */
        if (inner > 0) {
            for (int32_t i = 0; i < inner; i++) o[k + i] = s[i];
            for (int32_t d = 1; d <= 2 * k; d++) ap_or_bytes(o + k, s + d, inner);
            ap_nonzero_to_255(o + k, inner);
        }
        for (int32_t x = 0; x < w; x++) {        /* the edges (and narrow rows) */
            if (x == k && inner > 0) x = w - k;
            if (x >= w) break;
            uint8_t m = 0;
            for (int32_t d = x - k < 0 ? 0 : x - k; d <= x + k && d < w; d++) m |= s[d];
            o[x] = m ? 255 : 0;
        }
    }
    for (int32_t y = 0; y < h; y++) {            /* columns: OR over y-k..y+k (already 0/255) */
        int32_t ya = y - k < 0 ? 0 : y - k, yb = y + k > h - 1 ? h - 1 : y + k;
        uint8_t *o = dst + (size_t)y * w;
        const uint8_t *first = t + (size_t)ya * w;
        for (int32_t x = 0; x < w; x++) o[x] = first[x];
        for (int32_t r = ya + 1; r <= yb; r++) ap_or_bytes(o, t + (size_t)r * w, w);
    }
    return 0;
}

/* ---- blobs: 8-connected components of the nonzero pixels ------------------------------------- */

/* Order of the blobs reported: area descending, then y, x, w, h ascending (a total order on what
 * is reported, so both paths list the same blobs whatever their labelling order). */
static inline int ap_blob_before(const ap_blob *a, const ap_blob *b) {
    if (a->area != b->area) return a->area > b->area;
    if (a->y != b->y) return a->y < b->y;
    if (a->x != b->x) return a->x < b->x;
    if (a->w != b->w) return a->w < b->w;
    return a->h < b->h;
}

static inline int32_t ap_img_find(int32_t i) {
    int32_t *p = ap_img_run_parent;
    while (p[i] != i) { p[i] = p[p[i]]; i = p[i]; }
    return i;
}

/* Writes the min(count, max_out) first blobs with area >= min_area (in that order) to out;
 * returns count, the number of such blobs. min_area >= 1, 0 <= max_out <= 4096. Runs of
 * nonzero pixels are joined with the runs they touch (diagonals included) in the row above. */
static int32_t ap_img_blobs_c(const uint8_t *mask, int32_t w, int32_t h, int32_t min_area, ap_blob *out,
                              int32_t max_out) {
    if (!ap_img_size_ok(w, h) || (int64_t)w * h > AP_IMAGE_MAX_PIXELS || min_area < 1 || max_out < 0 ||
        max_out > 4096)
        return -1;
    uint16_t *x0 = ap_img_run_x0, *x1 = ap_img_run_x1;
    int32_t *parent = ap_img_run_parent;
    int32_t nruns = 0, prev_start = 0, prev_end = 0;
    static int32_t run_row_start[AP_IMAGE_MAX_SIDE + 1];
    for (int32_t y = 0; y < h; y++) {
        const uint8_t *row = mask + (size_t)y * w;
        int32_t start = nruns, p = prev_start;
        run_row_start[y] = start;
        int32_t x = 0;
        while (x < w) {
            while (x < w && !row[x]) x++;
            if (x >= w) break;
            int32_t a = x;
            while (x < w && row[x]) x++;
            int32_t b = x - 1, r = nruns++;
            x0[r] = (uint16_t)a; x1[r] = (uint16_t)b; parent[r] = r;
            /* runs above that touch [a-1, b+1]: skip those ending before a-1 */
            while (p < prev_end && (int32_t)x1[p] + 1 < a) p++;
            for (int32_t q = p; q < prev_end && (int32_t)x0[q] <= b + 1; q++) {
                int32_t ra = ap_img_find(q), rb = ap_img_find(r);
                if (ra != rb) { if (ra < rb) parent[rb] = ra; else parent[ra] = rb; }
            }
        }
        prev_start = start;
        prev_end = nruns;
    }
    run_row_start[h] = nruns;
    /* accumulate per blob: the root, the smallest run index of its set, is visited first */
    int32_t nblobs = 0;
    ap_blob *acc = ap_img_blob_acc;
    for (int32_t y = 0; y < h; y++) {
        for (int32_t r = run_row_start[y]; r < run_row_start[y + 1]; r++) {
            int32_t root = ap_img_find(r);
            int32_t id;
            if (root == r) {   /* the blob's first run: its id goes where x0/x1 were */
                id = nblobs++;
                acc[id].x = x0[r]; acc[id].y = y; acc[id].w = x1[r]; acc[id].h = y;
                acc[id].area = (int32_t)x1[r] - (int32_t)x0[r] + 1;
                x0[r] = (uint16_t)(id & 0xffff);
                x1[r] = (uint16_t)((uint32_t)id >> 16);
                continue;
            }
            id = (int32_t)x0[root] | ((int32_t)x1[root] << 16);
            ap_blob *bl = &acc[id];
            int32_t a = x0[r], b = x1[r];
            if (a < bl->x) bl->x = a;
            if (b > bl->w) bl->w = b;          /* w holds max x until the end */
            bl->h = y;                         /* h holds max y */
            bl->area += b - a + 1;
        }
    }
    int32_t count = 0, kept = 0;
    for (int32_t i = 0; i < nblobs; i++) {
        ap_blob bl = acc[i];
        bl.w = bl.w - bl.x + 1;
        bl.h = bl.h - bl.y + 1;
        if (bl.area < min_area) continue;
        count++;
        if (max_out == 0) continue;
        if (kept == max_out && !ap_blob_before(&bl, &out[kept - 1])) continue;
        int32_t j = kept < max_out ? kept++ : kept - 1;
        while (j > 0 && ap_blob_before(&bl, &out[j - 1])) { out[j] = out[j - 1]; j--; }
        out[j] = bl;
    }
    return count;
}

/* ---- dispatch ------------------------------------------------------------------------------- */

static inline int32_t ap_img_downscale(const uint8_t *src, int32_t w, int32_t h, int32_t factor, uint8_t *dst) {
    if (ap_img_use_host) return ap_host_img_downscale(src, w, h, factor, dst);
    return ap_img_downscale_c(src, w, h, factor, dst);
}

static inline int32_t ap_img_blur(const uint8_t *src, uint8_t *dst, int32_t w, int32_t h, int32_t kernel) {
    if (ap_img_use_host) return ap_host_img_blur(src, dst, w, h, kernel);
    return ap_img_blur_c(src, dst, w, h, kernel);
}

static inline int32_t ap_img_bg_subtract(const uint8_t *frame, uint16_t *bg, const uint8_t *valid, uint8_t *mask,
                                         int32_t n, int32_t threshold, int32_t alpha) {
    if (ap_img_use_host) return ap_host_img_bg_subtract(frame, bg, valid, mask, n, threshold, alpha);
    return ap_img_bg_subtract_c(frame, bg, valid, mask, n, threshold, alpha);
}

static inline int32_t ap_img_dilate(const uint8_t *src, uint8_t *dst, int32_t w, int32_t h, int32_t iterations) {
    if (ap_img_use_host) return ap_host_img_dilate(src, dst, w, h, iterations);
    return ap_img_dilate_c(src, dst, w, h, iterations);
}

static inline int32_t ap_img_blobs(const uint8_t *mask, int32_t w, int32_t h, int32_t min_area, ap_blob *out,
                                   int32_t max_out) {
    if (ap_img_use_host) return ap_host_img_blobs(mask, w, h, min_area, out, max_out);
    return ap_img_blobs_c(mask, w, h, min_area, out, max_out);
}

#endif /* AP_IMAGE_H */
