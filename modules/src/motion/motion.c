/*
 * motion: camera motion detection, ABI v1 (modules/ABI.md; docs/modules/motion.md).
 *
 * Per gray frame (an image window, ap_image_open): downscale by `scale` (box mean), blur, compare
 * with a running-average background (8.8 fixed point, learning rate `alpha`, faster at the start:
 * max(alpha, 1/frames seen)), threshold the absolute difference, dilate, and take the
 * 8-connected blobs whose area (at the frame's scale) is at least `min_area` as the motion boxes.
 * Masks (polygons) are ignored; zones (named polygons) are reported when a box has changed pixels
 * in them. When more than `global_fraction` of the (unmasked) frame changes at once, that is a
 * lighting change, not motion: the background is re-seeded from this frame.
 *
 * Events with hysteresis: `start_frames` consecutive frames with motion raise one event; after
 * `end_frames` frames without, one info event says how long it lasted.
 *
 * The per-pixel work is in modules/sdk/ap_image.h: C here, or the host's OpenCV twins when the
 * host offers them (`host.dsp=1`); both paths compute the same integers.
 *
 * Params (all optional):
 *   scale            integer downscale factor, 1..16                          (default 2)
 *   blur             none | box | gauss3 | gauss5                             (default gauss5)
 *   alpha            background learning rate per frame, (0, 1]              (default 0.03)
 *   threshold        gray levels of difference that count as change, 1..255  (default 25)
 *   dilate           3x3 dilation passes before the blobs, 0..8               (default 2)
 *   min_area         smallest blob, pixels of the received frame              (default 200)
 *   global_fraction  changed fraction above which it is a lighting change     (default 0.5)
 *   start_frames     consecutive motion frames that start an event            (default 2)
 *   end_frames       frames without motion that end it                        (default 10)
 *   severity         of the start event, 0..3                                  (default 1, warning)
 *   mask.<name>      "x1,y1;x2,y2;x3,y3;..." a polygon to ignore (frame pixels; up to 16)
 *   zone.<name>      "x1,y1;x2,y2;..." a named zone (up to 8); feature zone.<name> = 0/1
 */
#define MAX_IN_PIXELS (1920 * 1088)
#define AP_WINDOW_BYTES (64 + 3 * MAX_IN_PIXELS)
#include "ap_module.h"
#include "ap_dsp.h"     /* ap_features: all of a frame's features in one host call */
#include "ap_image.h"

#define MAX_WORK_PIXELS AP_IMAGE_MAX_PIXELS   /* the downscaled frame: 640 x 480 at most */
#define MAX_BOXES 8
#define MAX_ZONES 8
#define MAX_MASKS 16
#define MAX_POINTS 64
#define MAX_NAME 59                           /* "zone." + name <= 64, the feature name limit */

typedef struct { int32_t n; double x[MAX_POINTS], y[MAX_POINTS]; } polygon;

static struct {
    int32_t scale, blur, dilate, threshold, alpha_q12, start_frames, end_frames, severity;
    double min_area, global_fraction;
    polygon masks[MAX_MASKS], zones[MAX_ZONES];
    int32_t nmasks, nzones;
    char zone_names[MAX_ZONES][MAX_NAME + 1];
} cfg;

static struct {
    uint32_t w, h;              /* the frame size the buffers are set up for (0: none yet) */
    int32_t sw, sh, n;          /* the downscaled size */
    int32_t valid_count;
    uint32_t seen;              /* frames since the background was seeded (1 = seeded) */
    int32_t run, quiet, active;
    int64_t run_start_ns, last_motion_ns;
    uint64_t run_start_seq;
    int32_t event_frames, event_max_objects;
    uint32_t event_zones;
    int32_t warned_size;
} st;

static uint8_t gray_buf[MAX_IN_PIXELS];        /* BGR frames only: their gray version */
static uint8_t small_buf[MAX_WORK_PIXELS], blur_buf[MAX_WORK_PIXELS], mask_buf[MAX_WORK_PIXELS];
static uint8_t dil_buf[MAX_WORK_PIXELS], valid_buf[MAX_WORK_PIXELS], zone_buf[MAX_WORK_PIXELS];
static uint16_t bg_buf[MAX_WORK_PIXELS];
static ap_blob blobs[MAX_BOXES];
static const uint8_t *blob_mask;               /* the mask the blobs were found in */

/* feature names, 0-separated, boxes last so that k boxes use a prefix of the list */
#define FIXED_FEATURES 4
static char names[1024 + MAX_ZONES * 64];
static int32_t names_len_fixed, box_names_end[MAX_BOXES + 1];
static double values[FIXED_FEATURES + MAX_ZONES + 4 * MAX_BOXES];

/* ---- params --------------------------------------------------------------------------------- */

static int param_error(const char *what) {
    ap_log(AP_LOG_ERROR, what);
    return 1;
}

static int param_error2(const char *a, const char *b, int32_t blen, const char *c) {
    char buf[200];
    ap_text t = {buf, sizeof buf, 0};
    buf[0] = 0;
    ap_text_str(&t, a);
    for (int32_t i = 0; i < blen && t.len < t.cap - 1; i++) { buf[t.len++] = b[i]; buf[t.len] = 0; }
    ap_text_str(&t, c);
    return param_error(buf);
}

static int text_is(const char *v, int32_t n, const char *text) {
    int32_t m = ap_strlen(text);
    if (n != m) return 0;
    for (int32_t i = 0; i < n; i++) if (v[i] != text[i]) return 0;
    return 1;
}

static int starts_with(const char *s, int32_t n, const char *prefix) {
    int32_t m = ap_strlen(prefix);
    if (n < m) return 0;
    for (int32_t i = 0; i < m; i++) if (s[i] != prefix[i]) return 0;
    return 1;
}

static int name_char_ok(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-' ||
           c == '.' || c == ':';
}

/* "x1,y1;x2,y2;..." -> polygon; 0 on success. */
static int parse_polygon(const char *v, int32_t n, polygon *p) {
    p->n = 0;
    int32_t i = 0;
    while (i < n) {
        int32_t j = i;
        while (j < n && v[j] != ';') j++;
        int32_t c = i;
        while (c < j && v[c] != ',') c++;
        if (c == j || p->n >= MAX_POINTS) return 1;
        int okx, oky;
        double x = ap_parse_f64(v + i, c - i, &okx), y = ap_parse_f64(v + c + 1, j - c - 1, &oky);
        if (!okx || !oky || x < -100000 || x > 100000 || y < -100000 || y > 100000) return 1;
        p->x[p->n] = x;
        p->y[p->n] = y;
        p->n++;
        i = j + 1;
    }
    return p->n >= 3 ? 0 : 1;
}

static const char *const KNOWN[] = {"scale", "blur", "alpha", "threshold", "dilate", "min_area", "global_fraction",
                                    "start_frames", "end_frames", "severity", 0};

/* Every line: a known key, mask.<name>, zone.<name> or host.*; polygons are parsed here. */
static int parse_lines(const char *p, int32_t len) {
    ap_params_iter it = ap_params_begin(p, len);
    const char *key, *val;
    int32_t klen, vlen;
    while (ap_params_next(&it, &key, &klen, &val, &vlen)) {
        if (val) {
            if (starts_with(key, klen, "mask.") || starts_with(key, klen, "zone.")) {
                int zone = key[0] == 'z';
                if (klen == 5) return param_error("mask and zone names must not be empty");
                polygon *poly;
                if (zone) {
                    if (cfg.nzones >= MAX_ZONES) return param_error("at most 8 zones");
                    if (klen - 5 > MAX_NAME)
                        return param_error2("zone name too long (max 59 characters): ", key, klen, "");
                    for (int32_t k = 5; k < klen; k++)
                        if (!name_char_ok(key[k]))
                            return param_error2("zone names may hold only A-Z a-z 0-9 _ - . : (", key, klen, ")");
                    for (int32_t k = 5; k < klen; k++) cfg.zone_names[cfg.nzones][k - 5] = key[k];
                    cfg.zone_names[cfg.nzones][klen - 5] = 0;
                    poly = &cfg.zones[cfg.nzones++];
                } else {
                    if (cfg.nmasks >= MAX_MASKS) return param_error("at most 16 masks");
                    poly = &cfg.masks[cfg.nmasks++];
                }
                if (parse_polygon(val, vlen, poly))
                    return param_error2("", key, klen, " must be a polygon of 3..64 points \"x1,y1;x2,y2;x3,y3;...\" "
                                                       "(frame pixels)");
            } else if (!starts_with(key, klen, "host.")) {
                int known = 0;
                for (int32_t k = 0; KNOWN[k]; k++) known |= text_is(key, klen, KNOWN[k]);
                if (!known)
                    return param_error2("unknown param '", key, klen, "' (known: scale, blur, alpha, threshold, "
                                        "dilate, min_area, global_fraction, start_frames, end_frames, severity, "
                                        "mask.<name>, zone.<name>)");
            }
        }
    }
    return 0;
}

static int whole(double v, double lo, double hi) { return v >= lo && v <= hi && v == (double)(int32_t)v; }

static void make_names(void);

int32_t ap_init(const char *params, int32_t len) {
    static const polygon empty_poly;
    int bad = 0;
    ap_dsp_init(params, len);
    ap_image_init(params, len);
    cfg.nmasks = cfg.nzones = 0;
    for (int32_t i = 0; i < MAX_ZONES; i++) { cfg.zones[i] = empty_poly; cfg.zone_names[i][0] = 0; }
    if (parse_lines(params, len)) return 1;
    double scale = ap_param_f64(params, len, "scale", 2, &bad);
    double alpha = ap_param_f64(params, len, "alpha", 0.03, &bad);
    double threshold = ap_param_f64(params, len, "threshold", 25, &bad);
    double dilate = ap_param_f64(params, len, "dilate", 2, &bad);
    cfg.min_area = ap_param_f64(params, len, "min_area", 200, &bad);
    cfg.global_fraction = ap_param_f64(params, len, "global_fraction", 0.5, &bad);
    double start_frames = ap_param_f64(params, len, "start_frames", 2, &bad);
    double end_frames = ap_param_f64(params, len, "end_frames", 10, &bad);
    double severity = ap_param_f64(params, len, "severity", AP_SEV_WARNING, &bad);
    if (bad) return param_error("a param is not a number");
    if (!whole(scale, 1, 16)) return param_error("scale must be a whole number from 1 to 16");
    if (!(alpha > 0 && alpha <= 1)) return param_error("alpha must be in (0, 1]");
    if (!whole(threshold, 1, 255)) return param_error("threshold must be a whole number of gray levels from 1 to 255");
    if (!whole(dilate, 0, 8)) return param_error("dilate must be a whole number of passes from 0 to 8");
    if (!(cfg.min_area >= 1 && cfg.min_area <= 1e8)) return param_error("min_area must be from 1 to 1e8 pixels");
    if (!(cfg.global_fraction > 0 && cfg.global_fraction <= 1)) return param_error("global_fraction must be in (0, 1]");
    if (!whole(start_frames, 1, 1e6) || !whole(end_frames, 1, 1e6))
        return param_error("start_frames and end_frames must be whole numbers from 1 to 1000000");
    if (!whole(severity, 0, 3)) return param_error("severity must be 0 (info) .. 3 (critical)");
    cfg.scale = (int32_t)scale;
    cfg.alpha_q12 = (int32_t)(alpha * AP_IMAGE_ALPHA_ONE + 0.5);
    if (cfg.alpha_q12 < 1) cfg.alpha_q12 = 1;
    cfg.threshold = (int32_t)threshold;
    cfg.dilate = (int32_t)dilate;
    cfg.start_frames = (int32_t)start_frames;
    cfg.end_frames = (int32_t)end_frames;
    cfg.severity = (int32_t)severity;
    int32_t vlen;
    const char *b = ap_param_find(params, len, "blur", &vlen);
    if (!b || text_is(b, vlen, "gauss5")) cfg.blur = AP_BLUR_GAUSS5;
    else if (text_is(b, vlen, "gauss3")) cfg.blur = AP_BLUR_GAUSS3;
    else if (text_is(b, vlen, "box")) cfg.blur = AP_BLUR_BOX3;
    else if (text_is(b, vlen, "none")) cfg.blur = 0;
    else return param_error("blur must be none, box, gauss3 or gauss5");
    static const __typeof__(st) fresh;
    st = fresh;
    make_names();
    return 0;
}

/* ---- feature names -------------------------------------------------------------------------- */

static int32_t put_name(int32_t at, const char *a, const char *b) {
    while (*a) names[at++] = *a++;
    while (b && *b) names[at++] = *b++;
    names[at++] = 0;
    return at;
}

static void make_names(void) {
    int32_t at = 0;
    at = put_name(at, "changed_fraction", 0);
    at = put_name(at, "motion", 0);
    at = put_name(at, "lighting", 0);
    at = put_name(at, "boxes", 0);
    for (int32_t z = 0; z < cfg.nzones; z++) at = put_name(at, "zone.", cfg.zone_names[z]);
    names_len_fixed = at;
    box_names_end[0] = at;
    static const char *const parts[] = {".x", ".y", ".w", ".h"};
    for (int32_t i = 0; i < MAX_BOXES; i++) {
        char prefix[8] = {'b', 'o', 'x', (char)('0' + i), 0};
        for (int32_t k = 0; k < 4; k++) at = put_name(at, prefix, parts[k]);
        box_names_end[i + 1] = at;
    }
}

/* ---- polygons to masks ---------------------------------------------------------------------- */

/* Pixel (i, j) of the downscaled frame is inside when its centre, ((j + 0.5) s, (i + 0.5) s) in
 * frame pixels, is inside the polygon (even-odd rule); bit is OR-ed into out (or cleared when
 * clear). */
static void rasterize(const polygon *p, uint8_t *out, int32_t sw, int32_t sh, int32_t s, uint8_t bit, int clear) {
    double xs[MAX_POINTS];
    for (int32_t i = 0; i < sh; i++) {
        double yc = (i + 0.5) * s;
        int32_t nx = 0;
        for (int32_t k = 0; k < p->n; k++) {
            int32_t k2 = k + 1 == p->n ? 0 : k + 1;
            double y1 = p->y[k], y2 = p->y[k2];
            if ((y1 <= yc) == (y2 <= yc)) continue;
            double x = p->x[k] + (yc - y1) * (p->x[k2] - p->x[k]) / (y2 - y1);
            int32_t j = nx++;
            while (j > 0 && xs[j - 1] > x) { xs[j] = xs[j - 1]; j--; }
            xs[j] = x;
        }
        for (int32_t k = 0; k + 1 < nx; k += 2) {
            /* centres (j + 0.5) s in [xa, xb): j from ceil(xa/s - 0.5) to ceil(xb/s - 0.5) - 1 */
            double a = xs[k] / s - 0.5, b = xs[k + 1] / s - 0.5;
            if (a < -1) a = -1;
            if (b > sw + 1) b = sw + 1;
            if (!(a < b)) continue;
            int32_t ja = (int32_t)(a + 2) - 2, jb = (int32_t)(b + 2) - 2;   /* floor for a, b >= -1 */
            if ((double)ja < a) ja++;                                         /* ceil */
            if ((double)jb < b) jb++;
            if (ja < 0) ja = 0;
            if (jb > sw) jb = sw;
            uint8_t *row = out + (size_t)i * sw;
            for (int32_t j = ja; j < jb; j++) row[j] = clear ? 0 : (uint8_t)(row[j] | bit);
        }
    }
}

static void setup(uint32_t w, uint32_t h) {
    int32_t s = cfg.scale;
    st.w = w;
    st.h = h;
    st.sw = (int32_t)w / s;
    st.sh = (int32_t)h / s;
    st.n = st.sw * st.sh;
    for (int32_t i = 0; i < st.n; i++) { valid_buf[i] = 255; zone_buf[i] = 0; }
    for (int32_t m = 0; m < cfg.nmasks; m++) rasterize(&cfg.masks[m], valid_buf, st.sw, st.sh, s, 0, 1);
    for (int32_t z = 0; z < cfg.nzones; z++) rasterize(&cfg.zones[z], zone_buf, st.sw, st.sh, s, (uint8_t)(1u << z), 0);
    st.valid_count = 0;
    for (int32_t i = 0; i < st.n; i++) st.valid_count += valid_buf[i] != 0;
    st.seen = 0;
    st.run = st.quiet = st.active = 0;
}

/* ---- events --------------------------------------------------------------------------------- */

static void zone_list(ap_text *t, uint32_t zones) {
    int first = 1;
    for (int32_t z = 0; z < cfg.nzones; z++) {
        if (!(zones & (1u << z))) continue;
        if (!first) ap_text_str(t, ", ");
        ap_text_str(t, cfg.zone_names[z]);
        first = 0;
    }
}

static int popcount(uint32_t v) { int n = 0; while (v) { n += v & 1; v >>= 1; } return n; }

static void start_event(int32_t objects, double fraction, uint32_t zones) {
    char buf[400];
    ap_text t = {buf, sizeof buf, 0};
    buf[0] = 0;
    if (zones) {
        ap_text_str(&t, popcount(zones) > 1 ? "motion in zones " : "motion in zone ");
        zone_list(&t, zones);
        ap_text_str(&t, ": ");
    } else {
        ap_text_str(&t, cfg.nzones ? "motion outside the zones: " : "motion: ");
    }
    ap_text_int(&t, objects);
    ap_text_str(&t, objects == 1 ? " object, " : " objects, ");
    ap_text_num(&t, fraction * 100, 1);
    ap_text_str(&t, "% of the frame changed");
    ap_event(cfg.severity, fraction * 100, buf);
}

static void end_event(void) {
    char buf[400];
    ap_text t = {buf, sizeof buf, 0};
    buf[0] = 0;
    double seconds = (double)(st.last_motion_ns - st.run_start_ns) / 1e9;
    if (seconds < 0) seconds = 0;
    ap_text_str(&t, "motion ended after ");
    ap_text_num(&t, seconds, 1);
    ap_text_str(&t, " s (");
    ap_text_int(&t, st.event_frames);
    ap_text_str(&t, " frames with motion, up to ");
    ap_text_int(&t, st.event_max_objects);
    ap_text_str(&t, st.event_max_objects == 1 ? " object" : " objects");
    if (st.event_zones) {
        ap_text_str(&t, popcount(st.event_zones) > 1 ? "; zones " : "; zone ");
        zone_list(&t, st.event_zones);
    }
    ap_text_str(&t, ")");
    ap_event(AP_SEV_INFO, 0, buf);
}

/* ---- a frame -------------------------------------------------------------------------------- */

/* Zones in which the box (downscaled pixels) has changed pixels. */
static uint32_t zones_of(const ap_blob *b) {
    uint32_t any = 0;
    for (int32_t y = b->y; y < b->y + b->h; y++) {
        const uint8_t *m = blob_mask + (size_t)y * st.sw, *z = zone_buf + (size_t)y * st.sw;
        for (int32_t x = b->x; x < b->x + b->w; x++) if (m[x]) any |= z[x];
    }
    return any;
}

int32_t ap_process(const uint8_t *window, int32_t len) {
    const ap_window_header *h = ap_image_open(window, len);
    if (!h) {
        ap_log(AP_LOG_ERROR, "motion: not an image window (a camera source gives one frame per window)");
        return -1;
    }
    if (h->channels != 1 && h->channels != 3) {
        ap_log(AP_LOG_ERROR, "motion: frames must be gray (1 channel) or BGR (3 channels)");
        return -2;
    }
    int32_t s = cfg.scale;
    if (h->frames > MAX_IN_PIXELS || h->width < (uint32_t)s || h->height < (uint32_t)s ||
        (int64_t)(h->width / s) * (h->height / s) > MAX_WORK_PIXELS) {
        if (!st.warned_size) {
            char buf[200];
            ap_text t = {buf, sizeof buf, 0};
            buf[0] = 0;
            ap_text_str(&t, "motion: frame ");
            ap_text_int(&t, h->width);
            ap_text_str(&t, "x");
            ap_text_int(&t, h->height);
            ap_text_str(&t, " too large or small: at most 1920x1088 in, and 640x480 pixels after the scale "
                            "(raise scale or set the camera's resize)");
            ap_log(AP_LOG_ERROR, buf);
            st.warned_size = 1;
        }
        return -3;
    }
    const uint8_t *plane = ap_image_plane(h, 0);
    if (h->channels == 3) {                       /* BGR planes: gray = (B + 2G + R + 2) / 4 */
        const uint8_t *bp = plane, *gp = plane + h->frames, *rp = plane + 2 * (size_t)h->frames;
        for (uint32_t i = 0; i < h->frames; i++)
            gray_buf[i] = (uint8_t)(((uint32_t)bp[i] + 2u * gp[i] + rp[i] + 2) >> 2);
        plane = gray_buf;
    }
    if (h->width != st.w || h->height != st.h) setup(h->width, h->height);
    int32_t sw = st.sw, sh = st.sh, n = st.n;

    const uint8_t *img = plane;
    if (s > 1) {
        if (ap_img_downscale(plane, (int32_t)h->width, (int32_t)h->height, s, small_buf) < 0) return -4;
        img = small_buf;
    }
    if (cfg.blur) {
        if (ap_img_blur(img, blur_buf, sw, sh, cfg.blur) < 0) return -4;
        img = blur_buf;
    }

    int32_t count = 0, nblobs = 0, lighting = 0;
    double fraction = 0;
    uint32_t zones = 0;
    if (st.seen == 0) {                           /* first frame: it is the background */
        if (ap_img_bg_subtract(img, bg_buf, valid_buf, mask_buf, n, cfg.threshold, AP_IMAGE_ALPHA_ONE) < 0) return -4;
        st.seen = 1;
    } else {
        int32_t a = AP_IMAGE_ALPHA_ONE / (int32_t)(st.seen + 1);
        if (a < cfg.alpha_q12) a = cfg.alpha_q12;
        count = ap_img_bg_subtract(img, bg_buf, valid_buf, mask_buf, n, cfg.threshold, a);
        if (count < 0) return -4;
        if (st.seen < 0x40000000u) st.seen++;
        fraction = st.valid_count ? (double)count / st.valid_count : 0.0;
        if (fraction > cfg.global_fraction) {     /* lighting, not motion: start the background afresh */
            lighting = 1;
            if (ap_img_bg_subtract(img, bg_buf, valid_buf, mask_buf, n, cfg.threshold, AP_IMAGE_ALPHA_ONE) < 0)
                return -4;
            st.seen = 1;
        } else if (count > 0) {
            blob_mask = mask_buf;
            if (cfg.dilate) {
                if (ap_img_dilate(mask_buf, dil_buf, sw, sh, cfg.dilate) < 0) return -4;
                blob_mask = dil_buf;
            }
            double min_px = cfg.min_area / ((double)s * s);
            int32_t min_area = (int32_t)min_px;
            if ((double)min_area < min_px) min_area++;
            if (min_area < 1) min_area = 1;
            nblobs = ap_img_blobs(blob_mask, sw, sh, min_area, blobs, MAX_BOXES);
            if (nblobs < 0) return -4;
            if (cfg.nzones) {
                int32_t shown = nblobs < MAX_BOXES ? nblobs : MAX_BOXES;
                for (int32_t i = 0; i < shown; i++) zones |= zones_of(&blobs[i]);
            }
        }
    }
    int motion = nblobs > 0;

    /* features: fixed ones, zones, then the boxes in frame pixels */
    int32_t shown = nblobs < MAX_BOXES ? nblobs : MAX_BOXES, k = 0;
    values[k++] = fraction;
    values[k++] = motion;
    values[k++] = lighting;
    values[k++] = nblobs;
    for (int32_t z = 0; z < cfg.nzones; z++) values[k++] = (zones >> z) & 1;
    for (int32_t i = 0; i < shown; i++) {
        values[k++] = blobs[i].x * s;
        values[k++] = blobs[i].y * s;
        values[k++] = blobs[i].w * s;
        values[k++] = blobs[i].h * s;
    }
    ap_features(names, box_names_end[shown], values, k);

    /* hysteresis */
    if (motion) {
        if (st.run == 0) { st.run_start_ns = h->start_time_ns; st.run_start_seq = h->sequence; }
        st.run++;
        st.quiet = 0;
        st.last_motion_ns = h->start_time_ns;
        if (st.active) {
            st.event_frames++;
            st.event_zones |= zones;
            if (nblobs > st.event_max_objects) st.event_max_objects = nblobs;
        } else if (st.run >= cfg.start_frames) {
            st.active = 1;
            st.event_frames = st.run;
            st.event_zones = zones;
            st.event_max_objects = nblobs;
            start_event(nblobs, fraction, zones);
        }
    } else {
        st.quiet++;
        if (!st.active) st.run = 0;
        if (st.active && st.quiet >= cfg.end_frames) {
            end_event();
            st.active = 0;
            st.run = 0;
        }
    }
    return 0;
}
