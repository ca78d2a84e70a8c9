/*
 * bearing: rolling-element bearing monitoring (ABI v1) with the envelope spectrum, the ISO 20816-3
 * zone, a learned baseline and a diagnosis in every event.
 *
 * Per channel and window (up to 4 channels x 16384 frames, frames a power of two):
 *   rms, peak, crest, kurtosis, skewness of the mean-removed signal (g);
 *   velocity_rms over [velocity.low_hz, velocity.high_hz] in mm/s, integrated in the spectrum;
 *   band0..band7: RMS (g) of 8 equal bands over [0, fs/2);
 *   envelope spectrum: band-pass [envelope.low_hz, envelope.high_hz] in the spectrum, magnitude
 *   of the analytic signal (the band and its Hilbert transform: ap_envelope), FFT; its amplitude
 *   near BPFO, BPFI, 2xBSF and FTF (h = 1..3) against the median of the envelope spectrum:
 *   env.outer/inner/ball/cage (g, h = 1), env.<kind>.ratio (mean over h), env.floor.
 * Per window: shaft_hz (fixed, or estimated on channel 0 within a range and tracked: the median
 * of the last shaft.track_windows estimates), bpfo_hz, bpfi_hz,
 * bsf_hz, ftf_hz, iso_zone; baseline.progress while learning, then score, diagnosis,
 * diagnosis.ratio and diagnosis.peak_hz. modules/src/bearing/reference.py is the same analysis in
 * numpy; tests/test_bearing_module.py holds the two together. The heavy loops are the SDK's
 * ap_dsp.h kernels (moments, FFTs, band powers, envelope, median, feature batch), which the host
 * runs natively when it offers them (host.dsp=1).
 *
 * Params (flattened keys, see modules/ABI.md "Params"):
 *   bearing.balls, bearing.ball_diameter, bearing.pitch_diameter   geometry (same length unit)
 *   bearing.contact_angle_deg                                      default 0
 *   shaft.rpm  or  shaft.rpm_min + shaft.rpm_max                   exactly one of the two
 *   velocity.low_hz / velocity.high_hz                             default 10 / 1000
 *   envelope.low_hz / envelope.high_hz                             default fs/8 / 3fs/8
 *   iso.group (1|2, default 2), iso.foundation (rigid|flexible, default rigid)
 *   baseline.windows (default 50, 2..1024), threshold (default 4), confirm (2), clear_ratio (0.7),
 *   clear_windows (5), min_spread (0.05), host.dsp (set by the host)
 *   diagnosis.band (kurtogram|fixed), diagnosis.prewhiten (none|cepstrum), diagnosis.envelope
 *   (squared|magnitude), diagnosis.windows (8), diagnosis.min_confidence (0.3), diagnosis.margin (0.1)
 *
 * Score: the RMS of robust z-scores over the baseline vector (see baseline_vector()),
 * score = sqrt(sum z_i^2 / F), z_i = (v_i - median_i) / spread_i, spread_i = 1.4826 MAD_i floored
 * at min_spread for ln features (a relative change) and min_spread |median_i| for the others, and
 * at 1e-9. The RMS (not the sum) keeps the threshold independent of the channel count: healthy
 * data scores about 1 whatever F is.
 */
#define AP_MAX_CHANNELS 4
#define AP_DSP_MAX_N 16384
#define AP_WINDOW_BYTES (64 + 4 * AP_MAX_CHANNELS * AP_DSP_MAX_N)
#include "ap_module.h"
#include "ap_dsp.h"

/* Optional import: the host saves the state blob when told it changed (baseline learned). */
AP_IMPORT(state_changed) void ap_host_state_changed(void);

#define N_MAX AP_DSP_MAX_N
#define G_TO_MM_S2 9806.65             /* standard gravity, mm/s^2 per g */
#define HARMONICS 3
#define MAX_BASELINE 1024
#define MAX_FEATURES 64
#define PER_CHANNEL_MAX 22
#define MAX_TRACK 64
#define LOG_TINY 1e-12                 /* ln(v + LOG_TINY): envelope amplitudes can be 0 */

enum { K_OUTER, K_INNER, K_BALL, K_CAGE, N_KINDS };
static const char *const kind_words[N_KINDS] = {"outer race", "inner race", "rolling element", "cage"};
static const char *const kind_freq[N_KINDS] = {"BPFO", "BPFI", "2xBSF", "FTF"};

/* ISO 20816-3:2022, Annex A, Table A.1 (group 1: large machines, 300 kW .. 50 MW) and Table A.2
 * (group 2: medium machines, 15 kW .. 300 kW): zone boundaries A/B, B/C, C/D of the broadband
 * velocity RMS in mm/s (10..1000 Hz above 600 r/min), for rigid and flexible foundations. Same
 * values as ISO 10816-3:2009. */
static const double iso_bounds[2][2][3] = {
    {{2.3, 4.5, 7.1}, {3.5, 7.1, 11.0}},     /* group 1: rigid, flexible */
    {{1.4, 2.8, 4.5}, {2.3, 4.5, 7.1}},      /* group 2: rigid, flexible */
};

static struct {
    int32_t balls;
    double ball_d, pitch_d, angle_deg, cos_a;
    int fixed_rpm;
    double rpm, rpm_min, rpm_max;
    int32_t track_windows;              /* speed: median of the last N window estimates */
    double vel_lo, vel_hi;
    int env_lo_set, env_hi_set;         /* else the defaults fs/8 and 3fs/8 */
    double env_lo, env_hi;
    int32_t iso_group, iso_flexible;
    int32_t baseline_windows, confirm, clear_windows;
    double threshold, clear_ratio, min_spread;
    int32_t diag_kurtogram, diag_whiten, diag_squared, diag_windows;
    double min_conf, margin;
} cfg;

/* The persistent part of the state, exported as one self-contained blob (ap_state_ptr). */
#define STATE_MAGIC 0x53425041u         /* "APBS" little-endian */
#define STATE_VERSION 1u
typedef struct {
    uint32_t magic, version;
    uint32_t params_hash;               /* geometry, shaft, bands, channels, frames, nfeat */
    uint32_t learned;                   /* 1: median and spread hold a learned baseline */
    uint32_t channels, frames, nfeat, reserved;
    double median[MAX_FEATURES], spread[MAX_FEATURES];
} state_blob;

static state_blob blob;

static struct {
    int32_t learned;                    /* windows learned so far */
    uint32_t channels, frames;          /* shape of the windows the baseline is for (0: none yet) */
    ap_story story;                     /* the event story (ap_module.h) */
    double speeds[MAX_TRACK];           /* the last track_windows speed estimates (Hz), a ring */
    int32_t speeds_n, speeds_next;
} st;

static double rows[MAX_BASELINE][MAX_FEATURES];   /* baseline vectors while learning */
static double column[MAX_BASELINE];

/* Work buffers for all channels, one after another (the batches of ap_dsp.h): n floats per
 * signal, n + 2 per spectrum. */
static float xd[AP_MAX_CHANNELS * N_MAX];            /* mean-removed signals, later their envelopes */
static float spec[AP_MAX_CHANNELS * (N_MAX + 2)];    /* their spectra X (kept for the diagnosis) */
static float espec[AP_MAX_CHANNELS * (N_MAX + 2)];   /* envelope spectra E, then the diagnostic ones */
#define AMP_ROW (N_MAX / 2 + 1)
static float amp[AP_MAX_CHANNELS][AMP_ROW];   /* A_k = 2 |E_k| / n per channel */
static float scratch[AMP_ROW];          /* the C median selects in a copy */

/* ---- params -------------------------------------------------------------------------------- */

static void make_names(void);

static int param_error(const char *what) {
    ap_log(AP_LOG_ERROR, what);
    return 1;
}

static int has_param(const char *p, int32_t len, const char *key) {
    int32_t vlen;
    return ap_param_find(p, len, key, &vlen) != 0;
}

static int param_is(const char *p, int32_t len, const char *key, const char *text) {
    int32_t vlen;
    const char *v = ap_param_find(p, len, key, &vlen);
    if (!v) return 0;
    int32_t n = ap_strlen(text);
    if (vlen != n) return 0;
    for (int32_t i = 0; i < n; i++) if (v[i] != text[i]) return 0;
    return 1;
}

/* FNV-1a: a stable fingerprint of what makes a learned baseline comparable. */
static uint32_t fnv(uint32_t h, const void *data, int32_t n) {
    const uint8_t *b = (const uint8_t *)data;
    for (int32_t i = 0; i < n; i++) { h ^= b[i]; h *= 16777619u; }
    return h;
}

static uint32_t params_hash(uint32_t channels, uint32_t frames, uint32_t nfeat) {
    double v[] = {(double)cfg.balls, cfg.ball_d, cfg.pitch_d, cfg.angle_deg, (double)cfg.fixed_rpm,
                  cfg.rpm, cfg.rpm_min, cfg.rpm_max, cfg.vel_lo, cfg.vel_hi, cfg.env_lo, cfg.env_hi};
    uint32_t u[] = {STATE_VERSION, channels, frames, nfeat, (uint32_t)cfg.env_lo_set, (uint32_t)cfg.env_hi_set};
    return fnv(fnv(2166136261u, v, sizeof v), u, sizeof u);
}

static void reset_learning(void) {
    st.learned = 0;
    st.channels = st.frames = 0;
    ap_story_reset(&st.story);
    static const state_blob empty;
    blob = empty;
    blob.magic = STATE_MAGIC;
    blob.version = STATE_VERSION;
}

int32_t ap_init(const char *params, int32_t len) {
    if (ap_params_check(params, len)) return 1;   /* a key not in module.yaml's params */
    int bad = 0;
    ap_dsp_init(params, len);
    if (!has_param(params, len, "bearing.balls") || !has_param(params, len, "bearing.ball_diameter") ||
        !has_param(params, len, "bearing.pitch_diameter"))
        return param_error("bearing geometry missing: bearing.balls, bearing.ball_diameter and "
                           "bearing.pitch_diameter are required");
    double balls = ap_param_f64(params, len, "bearing.balls", 0, &bad);
    cfg.ball_d = ap_param_f64(params, len, "bearing.ball_diameter", 0, &bad);
    cfg.pitch_d = ap_param_f64(params, len, "bearing.pitch_diameter", 0, &bad);
    cfg.angle_deg = ap_param_f64(params, len, "bearing.contact_angle_deg", 0, &bad);
    cfg.fixed_rpm = has_param(params, len, "shaft.rpm");
    int ranged = has_param(params, len, "shaft.rpm_min") || has_param(params, len, "shaft.rpm_max");
    cfg.rpm = ap_param_f64(params, len, "shaft.rpm", 0, &bad);
    cfg.rpm_min = ap_param_f64(params, len, "shaft.rpm_min", 0, &bad);
    cfg.rpm_max = ap_param_f64(params, len, "shaft.rpm_max", 0, &bad);
    double track = ap_param_f64(params, len, "shaft.track_windows", 8, &bad);
    cfg.vel_lo = ap_param_f64(params, len, "velocity.low_hz", 10, &bad);
    cfg.vel_hi = ap_param_f64(params, len, "velocity.high_hz", 1000, &bad);
    cfg.env_lo_set = has_param(params, len, "envelope.low_hz");
    cfg.env_hi_set = has_param(params, len, "envelope.high_hz");
    cfg.env_lo = ap_param_f64(params, len, "envelope.low_hz", 0, &bad);
    cfg.env_hi = ap_param_f64(params, len, "envelope.high_hz", 0, &bad);
    double group = ap_param_f64(params, len, "iso.group", 2, &bad);
    /* Counts are range-checked as doubles: a wasm float-to-int conversion out of range traps. */
    double windows = ap_param_f64(params, len, "baseline.windows", 50, &bad);
    cfg.threshold = ap_param_f64(params, len, "threshold", 4.0, &bad);
    double confirm = ap_param_f64(params, len, "confirm", 2, &bad);
    cfg.clear_ratio = ap_param_f64(params, len, "clear_ratio", 0.7, &bad);
    double clear_windows = ap_param_f64(params, len, "clear_windows", 5, &bad);
    cfg.min_spread = ap_param_f64(params, len, "min_spread", 0.05, &bad);
    double diag_windows = ap_param_f64(params, len, "diagnosis.windows", 8, &bad);
    cfg.min_conf = ap_param_f64(params, len, "diagnosis.min_confidence", 0.3, &bad);
    cfg.margin = ap_param_f64(params, len, "diagnosis.margin", 0.1, &bad);
    if (bad) return param_error("a param is not a number");

    if (!(balls >= 1 && balls <= 1000) || balls != (double)(int32_t)balls)
        return param_error("bearing.balls must be a whole number of rolling elements from 1 to 1000");
    cfg.balls = (int32_t)balls;
    if (!(cfg.ball_d > 0)) return param_error("bearing.ball_diameter must be positive");
    if (!(cfg.pitch_d > cfg.ball_d))
        return param_error("bearing.pitch_diameter must exceed bearing.ball_diameter "
                           "(pitch diameter must exceed ball diameter)");
    if (!(cfg.angle_deg >= 0 && cfg.angle_deg < 90))
        return param_error("bearing.contact_angle_deg must be in [0, 90)");
    if (cfg.fixed_rpm == ranged)
        return param_error("give exactly one of shaft.rpm or shaft.rpm_min + shaft.rpm_max");
    if (cfg.fixed_rpm && !(cfg.rpm > 0)) return param_error("shaft.rpm must be positive");
    if (ranged && !(cfg.rpm_min > 0 && cfg.rpm_min < cfg.rpm_max))
        return param_error("shaft speed range needs 0 < shaft.rpm_min < shaft.rpm_max");
    if (!(track >= 1 && track <= MAX_TRACK) || track != (double)(int32_t)track)
        return param_error("shaft.track_windows must be a whole number from 1 to 64");
    cfg.track_windows = (int32_t)track;
    if (!(cfg.vel_lo > 0 && cfg.vel_lo < cfg.vel_hi))
        return param_error("velocity band needs 0 < velocity.low_hz < velocity.high_hz");
    if (group != 1 && group != 2) return param_error("iso.group must be 1 or 2");
    cfg.iso_group = (int32_t)group;
    if (has_param(params, len, "iso.foundation") && !param_is(params, len, "iso.foundation", "rigid") &&
        !param_is(params, len, "iso.foundation", "flexible"))
        return param_error("iso.foundation must be rigid or flexible");
    cfg.iso_flexible = param_is(params, len, "iso.foundation", "flexible");
    if (!(windows >= 2 && windows <= MAX_BASELINE))
        return param_error("baseline.windows must be in 2..1024");
    cfg.baseline_windows = (int32_t)windows;
    if (!(cfg.threshold > 0)) return param_error("threshold must be positive");
    if (!(confirm >= 1 && confirm <= 1e6 && clear_windows >= 1 && clear_windows <= 1e6))
        return param_error("confirm and clear_windows must be in 1..1000000");
    cfg.confirm = (int32_t)confirm;
    cfg.clear_windows = (int32_t)clear_windows;
    if (!(cfg.clear_ratio > 0 && cfg.clear_ratio <= 1)) return param_error("clear_ratio must be in (0, 1]");
    if (!(cfg.min_spread >= 0)) return param_error("min_spread must not be negative");
    if (!(diag_windows >= 1 && diag_windows <= 64) || diag_windows != (double)(int32_t)diag_windows)
        return param_error("diagnosis.windows must be a whole number from 1 to 64");
    cfg.diag_windows = (int32_t)diag_windows;
    if (!(cfg.min_conf > 0 && cfg.min_conf <= 1)) return param_error("diagnosis.min_confidence must be in (0, 1]");
    if (!(cfg.margin >= 0 && cfg.margin < 1)) return param_error("diagnosis.margin must be in [0, 1)");
    static const struct { const char *key, *on, *off; int32_t *dst; int32_t dflt; } choices[] = {
        {"diagnosis.band", "kurtogram", "fixed", &cfg.diag_kurtogram, 1},
        {"diagnosis.prewhiten", "cepstrum", "none", &cfg.diag_whiten, 0},
        {"diagnosis.envelope", "squared", "magnitude", &cfg.diag_squared, 1},
    };
    for (int i = 0; i < 3; i++) {
        *choices[i].dst = choices[i].dflt;
        if (!has_param(params, len, choices[i].key)) continue;
        if (param_is(params, len, choices[i].key, choices[i].on)) *choices[i].dst = 1;
        else if (param_is(params, len, choices[i].key, choices[i].off)) *choices[i].dst = 0;
        else {
            char msg[96];
            ap_text t = {msg, sizeof msg, 0};
            ap_text_str(&t, choices[i].key);
            ap_text_str(&t, " must be ");
            ap_text_str(&t, choices[i].dflt ? choices[i].on : choices[i].off);
            ap_text_str(&t, " or ");
            ap_text_str(&t, choices[i].dflt ? choices[i].off : choices[i].on);
            return param_error(msg);
        }
    }

    double s;
    ap_sincos(cfg.angle_deg * (AP_PI / 180), &s, &cfg.cos_a);
    make_names();
    reset_learning();
    st.speeds_n = st.speeds_next = 0;
    return 0;
}

/* ---- persistent state ------------------------------------------------------------------------ */

static void layout(uint32_t channels, int32_t *per, int32_t *groups) {
    int32_t budget = MAX_FEATURES / (int32_t)channels;
    if (budget > PER_CHANNEL_MAX) budget = PER_CHANNEL_MAX;
    *groups = budget >= 22 ? 8 : budget >= 18 ? 4 : 2;
    *per = 14 + *groups;
}

static int32_t n_features(uint32_t channels) {
    int32_t per, groups;
    layout(channels, &per, &groups);
    return per * (int32_t)channels;
}

AP_EXPORT(ap_state_size) int32_t ap_state_size(void) { return (int32_t)sizeof blob; }
AP_EXPORT(ap_state_ptr) uint8_t *ap_state_ptr(void) { return (uint8_t *)&blob; }

/* The host wrote a saved blob at ap_state_ptr(): 0 = accepted (start learned), else refused
 * (1 not ours, 2 for other params or window shape, 3 damaged) and learning starts over. */
AP_EXPORT(ap_state_loaded) int32_t ap_state_loaded(void) {
    int32_t rc = 0;
    if (blob.magic != STATE_MAGIC || blob.version != STATE_VERSION) rc = 1;
    else if (blob.learned != 1 || blob.channels < 1 || blob.channels > AP_MAX_CHANNELS ||
             !ap_is_pow2((int32_t)blob.frames) || blob.nfeat != (uint32_t)n_features(blob.channels)) rc = 3;
    else if (blob.params_hash != params_hash(blob.channels, blob.frames, blob.nfeat)) rc = 2;
    for (uint32_t i = 0; rc == 0 && i < blob.nfeat; i++)
        if (!ap_isfinite(blob.median[i]) || !(blob.spread[i] > 0) || !ap_isfinite(blob.spread[i])) rc = 3;
    if (rc) {
        ap_log(AP_LOG_WARNING, rc == 2 ? "saved baseline is for other params or window shape: relearning"
                                       : "saved baseline not usable: relearning");
        reset_learning();
        return rc;
    }
    st.learned = cfg.baseline_windows;
    st.channels = blob.channels;
    st.frames = blob.frames;
    ap_story_reset(&st.story);
    ap_log(AP_LOG_INFO, "baseline restored from saved state");
    return 0;
}

/* ---- analysis ------------------------------------------------------------------------------- */

typedef struct {
    double rms, peak, crest, kurtosis, skewness, velocity, bands[8];
    double env_amp[N_KINDS], env_ratio[N_KINDS], env_floor;
    double peak_hz[N_KINDS], peak_ratio[N_KINDS];     /* h = 1 evidence */
} channel_result;

typedef struct { double fr, bpfo, bpfi, bsf, ftf, f[N_KINDS]; } fault_freqs;

static void fault_frequencies(double fr, fault_freqs *ff) {
    double r = cfg.ball_d / cfg.pitch_d * cfg.cos_a;
    ff->fr = fr;
    ff->ftf = fr / 2 * (1 - r);
    ff->bpfo = cfg.balls * fr / 2 * (1 - r);
    ff->bpfi = cfg.balls * fr / 2 * (1 + r);
    ff->bsf = cfg.pitch_d * fr / (2 * cfg.ball_d) * (1 - r * r);
    ff->f[K_OUTER] = ff->bpfo;
    ff->f[K_INNER] = ff->bpfi;
    ff->f[K_BALL] = 2 * ff->bsf;        /* a ball defect strikes both races once per spin */
    ff->f[K_CAGE] = ff->ftf;
}

/* floor() as an integer, saturating: wasm traps on an out-of-range conversion, and absurd but
 * finite params (shaft.rpm=1e30) must give empty bin ranges, not a trap. */
static int64_t floor_i(double v) {
    if (!(v > -1e15)) return v != v ? 0 : -1000000000000000ll;
    if (v > 1e15) return 1000000000000000ll;
    int64_t i = (int64_t)v;
    return (double)i > v ? i - 1 : i;
}

/* Fractional offset of a spectral peak at bin k from the complex bins around it (Jacobsen:
 * delta = Re[(X_k-1 - X_k+1) / (2 X_k - X_k-1 - X_k+1)], clamped to half a bin). Nearly unbiased
 * for the rectangular window, where a parabola through |X| is off by up to half a bin. */
static double jacobsen(const float *X, int32_t k) {
    double ar = X[2 * k - 2], ai = X[2 * k - 1], br = X[2 * k], bi = X[2 * k + 1];
    double cr = X[2 * k + 2], ci = X[2 * k + 3];
    double nr = ar - cr, ni = ai - ci, dr = 2 * br - ar - cr, di = 2 * bi - ai - ci;
    double den = dr * dr + di * di;
    if (!(den > 0)) return 0;
    double delta = (nr * dr + ni * di) / den;     /* Re(num / den) */
    return delta < -0.5 ? -0.5 : delta > 0.5 ? 0.5 : delta;
}

/* Shaft frequency: the largest |X_k| in [lo, hi] Hz, refined by jacobsen() (a parabola through
 * |X| would be off by up to half a bin, which BPFI x 3 multiplies). */
static double estimate_shaft(const float *X, int32_t n, double bw, double lo, double hi) {
    int64_t klo = -floor_i(-lo / bw), khi = floor_i(hi / bw), k;
    if (klo < 1) klo = 1;
    if (khi > n / 2 - 1) khi = n / 2 - 1;
    if (klo > khi) {
        k = floor_i((lo + hi) / 2 / bw + 0.5);
        if (k < 1) k = 1;
        if (k > n / 2 - 1) k = n / 2 - 1;
    } else {
        double best = -1;
        k = klo;
        for (int64_t j = klo; j <= khi; j++) {
            double m = (double)X[2 * j] * X[2 * j] + (double)X[2 * j + 1] * X[2 * j + 1];
            if (m > best) { best = m; k = j; }
        }
    }
    double delta = jacobsen(X, (int32_t)k);
    double f = ((double)k + delta) * bw;
    return f < lo ? lo : f > hi ? hi : f;
}

/* The speed the analysis uses: the median of the last track_windows estimates (this one
 * included). A shaft's speed changes slowly against a window of a fraction of a second, while a
 * single window's estimate scatters by 1-3 % (measured on the CWRU recordings: 5th to 95th
 * percentile of 1750-1846 rpm at 1796 rpm); BPFI x 3 multiplies that error. A load step changes
 * the speed at once, though (1796 to 1721 rpm from 0 to 3 hp): when the track is full and the
 * last two estimates both lie on the same side of its median, further than 3 robust spreads of
 * the track (1.4826 MAD, at least 0.5 %), the track restarts from those two. */
static double track_shaft(double fr) {
    double copy[MAX_TRACK], med = fr;
    int32_t n = st.speeds_n;
    if (n >= 3 && n == cfg.track_windows) {
        for (int32_t i = 0; i < n; i++) copy[i] = st.speeds[i];
        med = ap_median_f64(copy, n);
        for (int32_t i = 0; i < n; i++) copy[i] = ap_fabs(st.speeds[i] - med);
        double spread = 1.4826 * ap_median_f64(copy, n), step = 3 * spread > 0.005 * med ? 3 * spread : 0.005 * med;
        double prev = st.speeds[(st.speeds_next + cfg.track_windows - 1) % cfg.track_windows];
        if ((fr - med > step && prev - med > step) || (med - fr > step && med - prev > step)) {
            st.speeds[0] = prev;
            st.speeds_n = 1;
            st.speeds_next = 1 % cfg.track_windows;
        }
    }
    st.speeds[st.speeds_next] = fr;
    st.speeds_next = (st.speeds_next + 1) % cfg.track_windows;
    if (st.speeds_n < cfg.track_windows) st.speeds_n++;
    for (int32_t i = 0; i < st.speeds_n; i++) copy[i] = st.speeds[i];
    return ap_median_f64(copy, st.speeds_n);
}

/* Bins k in [kmin, kmax] with lo <= k*bw <= hi, as [*k0, *k1] (empty: *k0 > *k1). The same
 * comparisons as a per-bin test, so the reference's masks give the same bins. */
static void bin_range(double lo, double hi, double bw, int32_t kmin, int32_t kmax, int32_t *k0, int32_t *k1) {
    double a = lo / bw, b = hi / bw;
    int64_t i = a < kmin ? kmin : a > kmax + 1 ? kmax + 1 : floor_i(a);
    while (i > kmin && (double)(i - 1) * bw >= lo) i--;
    while (i <= kmax && (double)i * bw < lo) i++;
    int64_t j = b > kmax ? kmax : b < kmin - 1 ? kmin - 1 : floor_i(b) + 1;
    while (j >= kmin && (double)j * bw > hi) j--;
    while (j < kmax && (double)(j + 1) * bw <= hi) j++;
    *k0 = (int32_t)i;
    *k1 = (int32_t)j;
}

/* Time-domain statistics of every channel (x: the planar samples) by one ap_moments; leaves
 * the mean-removed signals in xd. 0 if a sample is not finite. */
static int time_stats(const float *x, int32_t n, uint32_t channels, channel_result *res) {
    double mom[AP_MAX_CHANNELS][AP_MOM_COUNT];
    ap_moments(x, xd, n, (int32_t)channels, &mom[0][0]);
    for (uint32_t c = 0; c < channels; c++) {
        const double *m = mom[c];
        channel_result *r = &res[c];
        if (!ap_isfinite(m[AP_MOM_MEAN])) return 0;
        double m2 = m[AP_MOM_M2], m3 = m[AP_MOM_M3], m4 = m[AP_MOM_M4];
        double peak = m[AP_MOM_MAX] > -m[AP_MOM_MIN] ? m[AP_MOM_MAX] : -m[AP_MOM_MIN];
        r->rms = ap_sqrt(m2);
        r->peak = peak;
        r->crest = r->rms > 0 ? peak / r->rms : 0;
        r->kurtosis = m2 > 0 ? m4 / (m2 * m2) : 0;
        r->skewness = m2 > 0 ? m3 / (m2 * ap_sqrt(m2)) : 0;
        if (!(ap_isfinite(r->kurtosis) && ap_isfinite(r->skewness))) return 0;
    }
    return 1;
}

/* Velocity RMS and band energies from the spectra (one-sided Parseval), in one ap_band_power. */
static void spectral_stats(int32_t n, uint32_t channels, double bw, channel_result *res) {
    ap_band bands[9];
    double e[AP_MAX_CHANNELS][9];
    double scale = 2.0 / ((double)n * n);
    for (int b = 0; b < 8; b++) {           /* b n/16 <= k < (b+1) n/16, exact for any n */
        bands[b].k0 = b ? (b * n + 15) / 16 : 1;
        bands[b].k1 = ((b + 1) * n + 15) / 16 - 1;
        bands[b].p = 0;
    }
    /* V_k = X_k G / (2 pi f_k): g -> mm/s^2, then / (2 pi f) integrates to velocity; the
     * 1/f^2 is 1/(k bw)^2, so the band sums |X_k|^2 k^-2. */
    bin_range(cfg.vel_lo, cfg.vel_hi, bw, 1, n / 2 - 1, &bands[8].k0, &bands[8].k1);
    bands[8].p = -2;
    ap_band_power(spec, n, (int32_t)channels, bands, 9, &e[0][0]);
    double g = G_TO_MM_S2 / (2 * AP_PI * bw);
    for (uint32_t c = 0; c < channels; c++) {
        for (int b = 0; b < 8; b++) res[c].bands[b] = ap_sqrt(scale * e[c][b]);
        res[c].velocity = ap_sqrt(scale * e[c][8] * g * g);
    }
}

/* Envelope spectra of the band [lo, hi] Hz of every channel (ap_envelope, then their FFTs) into
 * espec; spec keeps the spectra for the diagnosis. */
static void envelope_spectra(int32_t n, uint32_t channels, double bw, double lo, double hi) {
    int32_t k0, k1;
    bin_range(lo, hi, bw, 0, n / 2, &k0, &k1);
    ap_envelope(spec, xd, n, (int32_t)channels, k0, k1);
    ap_rfft_batch(xd, espec, n, (int32_t)channels);
}

/* Amplitudes A_k = 2 |E_k| / n into a[0..upto]: only the bins the floor and the harmonics
 * look at. */
static void envelope_amplitudes(const float *env, int32_t n, int32_t upto, float *a) {
    double scale = 2.0 / n;
    for (int32_t k = 0; k <= upto; k++) a[k] = (float)(scale * ap_sqrt(ap_bin_power(env, k)));
}

/* The noise floor of each channel's envelope spectrum: the median of A_k over 2 <= k <= 5 BPFI,
 * all channels in one ap_median_rows. */
static void envelope_floors(int32_t n, uint32_t channels, double bw, const fault_freqs *ff, double *floors) {
    int64_t top = floor_i(5 * ff->bpfi / bw);
    int32_t hi = top < n / 2 ? (int32_t)top : n / 2, cnt = hi - 2 + 1;
    if (cnt < 0) cnt = 0;
    ap_median_rows(&amp[0][2], cnt, (int32_t)channels, AMP_ROW, floors, scratch);
}

/* The last envelope bin envelope_faults() reads: the floor's top and the highest harmonic. */
static int32_t amp_bins(int32_t n, double bw, const fault_freqs *ff) {
    double top = 5 * ff->bpfi;
    for (int kd = 0; kd < N_KINDS; kd++) {
        double t = HARMONICS * ff->f[kd], tol = bw > 0.01 * t ? bw : 0.01 * t;
        if (t + tol > top) top = t + tol;
    }
    double k = top / bw + 2;
    return k >= n / 2 ? n / 2 : (int32_t)k;
}

/* Fault-frequency amplitudes (amp: this channel's A_k, env: its E_k), ratios to the median
 * floor, and the h = 1 evidence. */
static void envelope_faults(const float *env, const float *amp, double floor, int32_t n, double bw,
                            const fault_freqs *ff, channel_result *r) {
    int32_t m = n / 2;
    r->env_floor = floor;
    for (int kd = 0; kd < N_KINDS; kd++) {
        double ratio_sum = 0;
        for (int h = 1; h <= HARMONICS; h++) {
            double t = h * ff->f[kd], tol = bw > 0.01 * t ? bw : 0.01 * t;
            int64_t k0 = floor_i((t - tol) / bw), k1 = floor_i((t + tol) / bw) + 1;   /* widened */
            if (k0 < 1) k0 = 1;
            if (k1 > m) k1 = m;
            int64_t best = -1;
            for (int64_t k = k0; k <= k1; k++) {
                double d = (double)k * bw - t;
                if (ap_fabs(d) <= tol && (best < 0 || amp[k] > amp[best])) best = k;
            }
            double a = best >= 0 ? amp[best] : 0;
            double ratio = floor > 0 ? a / floor : 0;
            ratio_sum += ratio;
            if (h == 1) {
                double hz = best >= 0 ? (double)best * bw : 0;
                if (best >= 1 && best < m) hz = ((double)best + jacobsen(env, (int32_t)best)) * bw;
                r->env_amp[kd] = a;
                r->peak_hz[kd] = hz;
                r->peak_ratio[kd] = ratio;
            }
        }
        r->env_ratio[kd] = ratio_sum / HARMONICS;
    }
}

/* ---- diagnosis: the part's signature in the squared envelope spectrum ----------------------- */

/* Once a window is anomalous, and for as long as its event story lasts, each window's diagnostic
 * envelope spectrum (diagnosis.band: the envelope band, or the band of largest spectral kurtosis;
 * diagnosis.prewhiten: cepstrum pre-whitening; diagnosis.envelope: squared or magnitude) joins a
 * running mean of its power over up to diagnosis.windows windows (noise averages out, lines stay),
 * and each part's signature is scored on that mean:
 *
 *   outer race  BPFO h = 1..3, its shaft-rate sidebands (+-fr) at least 6 dB below the carrier
 *               (a defect on the stationary race is not modulated by the shaft's turn)
 *   inner race  BPFI h = 1..3 with +-fr / +-2 fr sidebands present (the defect turns with the
 *               shaft through the load zone)
 *   ball        2 x BSF h = 1..3 with +-FTF sidebands present (the ball goes round with the cage)
 *   cage        FTF h = 1..3, weak evidence on its own: half weight
 *
 * A line is the largest power within bw/2 + tol x f of its frequency f (tol 1 % for the races,
 * 2 % for ball and cage, whose elements slip), over the median of the spectrum from bin 2 to
 * 5 x BPFI (the floor): its ratio r^2. A line two parts both predict (3 x BPFO and 2 x BPFI lie
 * 0.7 % apart) is evidence for neither and is left out. Presence of a group of lines: one minus
 * the chance that noise alone puts its strongest line that high in that many bins, from the
 * noise law of a K-window mean (power ~ Gamma(K, mean/K)). Confidence of a part: presence of its
 * carriers x presence of the sidebands it needs (or the outer race's sideband test, or the
 * cage's half weight) x the share of the spectrum's power above the floor (shaft harmonics aside:
 * the machine's, not the bearing's) that its lines carry. A part is named when its confidence
 * is at least diagnosis.min_confidence and beats the runner-up by diagnosis.margin. */

#define DIAG_TOL_RACE 0.01
#define DIAG_TOL_ELEMENT 0.02
#define DIAG_LINES 64

static float davg[AP_MAX_CHANNELS][AMP_ROW];   /* the running mean of the diagnostic spectra's power */
static struct {
    int32_t count;                      /* windows in the running mean (0: none) */
    double speeds[64];                  /* their speed estimates (Hz), a ring of diagnosis.windows */
    int32_t speeds_next;
    int32_t n;
    double fs;
    int32_t k0[AP_MAX_CHANNELS], k1[AP_MAX_CHANNELS];   /* this window's diagnostic band */
} dg;

typedef struct {
    double conf[N_KINDS], peak_hz[N_KINDS], peak_ratio[N_KINDS];
} diag_channel;

typedef struct {
    int32_t kind, carrier, h;           /* carrier: 1, sideband: 0 */
    double f, hw, mod;                  /* mod: a sideband's distance from its carrier */
    int excluded;
} diag_line;

static void diag_reset(void) { dg.count = 0; }

/* The probability that noise alone puts a K-window mean of one bin at r2 x the median or more:
 * the Gamma(K, 1/K) tail at r2 m_K, m_K its median (ln 2 for K = 1, 1 - 1/(3K) beyond:
 * Wilson-Hilferty), e^-x sum_{j<K} x^j/j!, x = K r2 m_K. */
static double noise_tail(double r2, int32_t k) {
    double mk = k == 1 ? 0.69314718055994530942 : 1 - 1.0 / (3.0 * k);
    double x = k * r2 * mk, term = 1, sum = 0;
    for (int32_t j = 0; j < k; j++) { sum += term; term *= x / (j + 1); }
    return ap_exp(-x) * sum;
}

/* 1 - (bins) x the noise tail, at least 0: the strongest of a group of lines is not noise. */
static double presence(double r2, int32_t bins, int32_t k) {
    double p = 1 - bins * noise_tail(r2, k);
    return p > 0 ? p : 0;
}

/* Every line the signatures test, with the ones two parts share marked excluded. */
static int32_t diag_lines(const fault_freqs *ff, double bw, diag_line *out) {
    int32_t n = 0;
    for (int kd = 0; kd < N_KINDS; kd++) {
        double tol = kd == K_OUTER || kd == K_INNER ? DIAG_TOL_RACE : DIAG_TOL_ELEMENT;
        double mods[2];
        int32_t nm = 0;
        if (kd == K_OUTER) mods[nm++] = ff->fr;
        if (kd == K_INNER) { mods[nm++] = ff->fr; mods[nm++] = 2 * ff->fr; }
        if (kd == K_BALL) mods[nm++] = ff->ftf;
        for (int32_t h = 1; h <= HARMONICS; h++) {
            double f = h * ff->f[kd], hw = bw / 2 + tol * f;
            out[n++] = (diag_line){kd, 1, h, f, hw, 0, 0};
            for (int32_t m = 0; m < nm; m++) {
                out[n++] = (diag_line){kd, 0, h, f - mods[m], hw, mods[m], 0};
                out[n++] = (diag_line){kd, 0, h, f + mods[m], hw, mods[m], 0};
            }
        }
    }
    for (int32_t i = 0; i < n; i++)
        for (int32_t j = 0; j < n; j++)
            if (out[j].carrier && out[j].kind != out[i].kind && ap_fabs(out[j].f - out[i].f) <= out[j].hw + out[i].hw)
                out[i].excluded = 1;
    return n;
}

/* The last bin the diagnosis reads: 5 x BPFI (the floor's top, past every tested line). */
static int32_t diag_top(int32_t n, double bw, const fault_freqs *ff) {
    int64_t top = floor_i(5 * ff->bpfi / bw);
    return top > n / 2 - 1 ? n / 2 - 1 : top < 2 ? 2 : (int32_t)top;
}

/* The largest r2 within a line's window (bins 2..top), its bin and the window's size in bins.
 * A sideband is measured against the larger of the floor and the spectrum half-way to its
 * neighbours (mean of the bins at f - mod/2 and f + mod/2): a carrier broadened by slip has
 * skirts that reach its sideband positions, and a skirt is not a sideband. */
static int32_t line_peak(const float *p, double floor2, double bw, int32_t top, const diag_line *l, double *r2,
                         int32_t *at) {
    int32_t k0, k1;
    bin_range(l->f - l->hw, l->f + l->hw, bw, 2, top, &k0, &k1);
    *r2 = 0;
    *at = -1;
    for (int32_t k = k0; k <= k1; k++)
        if (*at < 0 || p[k] > p[*at]) *at = k;
    double ref = floor2;
    if (!l->carrier) {
        int64_t a = floor_i((l->f - l->mod / 2) / bw + 0.5), b = floor_i((l->f + l->mod / 2) / bw + 0.5);
        a = a < 2 ? 2 : a > top ? top : a;
        b = b < 2 ? 2 : b > top ? top : b;
        double valley = 0.5 * ((double)p[a] + (double)p[b]);
        if (valley > ref) ref = valley;
    }
    if (*at >= 0 && ref > 0) *r2 = p[*at] / ref;
    return k1 >= k0 ? k1 - k0 + 1 : 0;
}

/* One channel's confidences from its running mean p (power per bin, bins 0..top). */
static void diag_channel_eval(const float *p, double floor2, int32_t top, double bw, const fault_freqs *ff,
                              const diag_line *lines, int32_t nlines, int32_t k, diag_channel *out) {
    /* The power above the floor, bins 2..top, shaft harmonics aside. */
    double total = 0;
    for (int32_t b = 2; b <= top; b++) {
        double f = b * bw;
        int64_t h = floor_i(f / ff->fr + 0.5);
        if (h >= 1 && ap_fabs(f - (double)h * ff->fr) <= bw / 2 + DIAG_TOL_RACE * (double)h * ff->fr) continue;
        double r2 = floor2 > 0 ? p[b] / floor2 : 0;
        if (r2 > 1) total += r2 - 1;
    }
    for (int kd = 0; kd < N_KINDS; kd++) {
        double c_max = 0, s_max = 0, sum = 0, best_c = -1;
        int32_t c_bins = 0, s_bins = 0, best_h = 0, at_best = -1;
        double sb_amp[HARMONICS + 1] = {0}, c_amp[HARMONICS + 1] = {0};
        int32_t sb_cnt[HARMONICS + 1] = {0};
        for (int32_t i = 0; i < nlines; i++) {
            const diag_line *l = &lines[i];
            if (l->kind != kd || l->excluded) continue;
            double r2;
            int32_t at, w = line_peak(p, floor2, bw, top, l, &r2, &at);
            if (!w) continue;
            double excess = (r2 > 1 ? r2 - 1 : 0) * presence(r2, w, k);
            if (l->carrier) {
                c_bins += w;
                if (r2 > c_max) c_max = r2;
                sum += excess;
                c_amp[l->h] = ap_sqrt(r2);
                if (r2 > best_c) { best_c = r2; best_h = l->h; at_best = at; }
            } else {
                s_bins += w;
                if (r2 > s_max) s_max = r2;
                if (kd == K_INNER || kd == K_BALL) sum += excess;
                sb_amp[l->h] += ap_sqrt(r2);
                sb_cnt[l->h]++;
            }
        }
        double factor = 1;
        if (kd == K_INNER || kd == K_BALL) factor = s_bins ? presence(s_max, s_bins, k) : 0;
        else if (kd == K_OUTER && best_h && sb_cnt[best_h] && c_amp[best_h] > 0) {
            double sbr = sb_amp[best_h] / sb_cnt[best_h] / c_amp[best_h];
            factor = sbr <= 0.5 ? 1 : sbr >= 1 ? 0 : 2 * (1 - sbr);
        } else if (kd == K_CAGE) factor = 0.5;
        double conf = c_bins && total > 0 ? presence(c_max, c_bins, k) * factor * sum / total : 0;
        out->conf[kd] = conf > 1 ? 1 : conf;
        out->peak_hz[kd] = at_best >= 0 ? at_best * bw : 0;
        out->peak_ratio[kd] = best_c > 0 ? ap_sqrt(best_c) : 0;
    }
}

/* The kurtogram's band per channel: the 1/3-binary tree of Antoni's fast kurtogram (1, 2, 3,
 * 4, 6, 8, 12, ... equal bands over [0, fs/2)), bands at least 4 x BPFI wide (room for BPFI's
 * first harmonic and its sidebands twice over), below fs/2.56 (the usable band of an
 * acquisition whose anti-alias filter starts there) and within 10 dB of the usable band's mean
 * power (SK ignores level: without that, a quiet band near the top that electrical spikes
 * excite wins - it did on the CWRU 48 kHz recordings, 10-18 kHz at 40 dB below the bearing's
 * resonance); the largest SK wins (ties: the wider, earlier band). Without such a band, the
 * envelope band. */
#define KURT_MIN_POWER 0.1
static void kurtogram_bands(int32_t n, uint32_t channels, double bw, double fs, const fault_freqs *ff,
                            int32_t k0_fixed, int32_t k1_fixed) {
    static ap_band bands[AP_BANDS_MAX];
    static double sk[AP_MAX_CHANNELS * AP_BANDS_MAX];
    int32_t nb = 0, half = n / 2;
    for (int32_t level = 0; level < 24 && nb < AP_BANDS_MAX - 1; level++) {
        int32_t count = level == 0 ? 1 : (level & 1) ? 1 << ((level + 1) / 2) : 3 << (level / 2 - 1);
        if (count > half || (double)half / count * bw < 4 * ff->bpfi) break;
        for (int32_t i = 0; i < count && nb < AP_BANDS_MAX - 1; i++) {
            int32_t k0 = (int32_t)((int64_t)i * half / count), k1 = (int32_t)((int64_t)(i + 1) * half / count) - 1;
            if (k0 < 1) k0 = 1;
            if (k1 > half - 1 || (k1 + 1) * bw > fs / 2.56 || k1 < k0) continue;
            bands[nb++] = (ap_band){k0, k1, 0};
        }
    }
    for (uint32_t c = 0; c < channels; c++) { dg.k0[c] = k0_fixed; dg.k1[c] = k1_fixed; }
    int64_t ku = floor_i(fs / 2.56 / bw) - 1;                   /* usable: (k + 1) bw <= fs/2.56 */
    if (!nb || ku < 1 || nb >= AP_BANDS_MAX) return;
    static ap_band pb[AP_BANDS_MAX];
    static double power[AP_MAX_CHANNELS * AP_BANDS_MAX];
    for (int32_t b = 0; b < nb; b++) pb[b] = bands[b];
    pb[nb] = (ap_band){1, ku > half - 1 ? half - 1 : (int32_t)ku, 0};
    ap_band_power(spec, n, (int32_t)channels, pb, nb + 1, power);
    ap_band_kurtosis(spec, n, (int32_t)channels, bands, nb, cfg.diag_whiten ? AP_ENV_WHITEN : 0, sk);
    for (uint32_t c = 0; c < channels; c++) {
        const double *pw = power + c * (nb + 1);
        double ref = pw[nb] / (pb[nb].k1 - pb[nb].k0 + 1);
        int32_t best = -1;
        for (int32_t b = 0; b < nb; b++) {
            if (pw[b] / (bands[b].k1 - bands[b].k0 + 1) < KURT_MIN_POWER * ref) continue;
            if (best < 0 || sk[c * nb + b] > sk[c * nb + best]) best = b;
        }
        if (best < 0) continue;
        dg.k0[c] = bands[best].k0;
        dg.k1[c] = bands[best].k1;
    }
}

/* This window's diagnostic spectra into the running mean, and each channel's confidences. The
 * fault frequencies are those of the median speed estimate of the windows averaged (fr_window:
 * this window's), not the longer track's: lines and speed come from the same stretch of time,
 * so a load step just before a fault does not put the expected lines where the last minute's
 * speed had them. */
static void diag_update(int32_t n, uint32_t channels, double bw, double fs, double env_lo, double env_hi,
                        double fr_window, fault_freqs *ff, diag_channel *out) {
    int32_t k0, k1;
    bin_range(env_lo, env_hi, bw, 0, n / 2, &k0, &k1);
    if (cfg.diag_kurtogram) kurtogram_bands(n, channels, bw, fs, ff, k0, k1);
    else for (uint32_t c = 0; c < channels; c++) { dg.k0[c] = k0; dg.k1[c] = k1; }
    int32_t flags = (cfg.diag_squared ? AP_ENV_SQUARED : 0) | (cfg.diag_whiten ? AP_ENV_WHITEN : 0);
    int same = 1;
    for (uint32_t c = 1; c < channels; c++) same &= dg.k0[c] == dg.k0[0] && dg.k1[c] == dg.k1[0];
    if (same) ap_envelope_ex(spec, xd, n, (int32_t)channels, dg.k0[0], dg.k1[0], flags);
    else
        for (uint32_t c = 0; c < channels; c++)
            ap_envelope_ex(spec + (size_t)c * (n + 2), xd + (size_t)c * n, n, 1, dg.k0[c], dg.k1[c], flags);
    ap_rfft_batch(xd, espec, n, (int32_t)channels);

    if (dg.n != n || dg.fs != fs) { dg.count = 0; dg.n = n; dg.fs = fs; }
    if (dg.count == 0) dg.speeds_next = 0;
    if (dg.count < cfg.diag_windows) dg.count++;
    dg.speeds[dg.speeds_next] = fr_window;
    dg.speeds_next = (dg.speeds_next + 1) % cfg.diag_windows;
    if (!cfg.fixed_rpm) {
        double copy[64];
        for (int32_t i = 0; i < dg.count; i++) copy[i] = dg.speeds[i];
        fault_frequencies(ap_median_f64(copy, dg.count), ff);
    }
    int32_t top = diag_top(n, bw, ff);
    /* The mean covers the bins any speed of the configured range reads (its top at the highest). */
    fault_freqs fmax;
    fault_frequencies(cfg.fixed_rpm ? cfg.rpm / 60 : cfg.rpm_max / 60, &fmax);
    int32_t mtop = diag_top(n, bw, &fmax);
    if (mtop < top) mtop = top;
    float a = 1.0f / (float)dg.count, scale = 4.0f / ((float)n * (float)n);   /* (2 |E_k| / n)^2 */
    for (uint32_t c = 0; c < channels; c++) {
        const float *e = espec + (size_t)c * (n + 2);
        float *m = davg[c];
        for (int32_t k = 0; k <= mtop; k++) {
            float pk = scale * (e[2 * k] * e[2 * k] + e[2 * k + 1] * e[2 * k + 1]);
            m[k] = dg.count == 1 ? pk : m[k] + a * (pk - m[k]);
        }
    }
    double floors[AP_MAX_CHANNELS];
    ap_median_rows(&davg[0][2], top - 1, (int32_t)channels, AMP_ROW, floors, scratch);
    diag_line lines[DIAG_LINES];
    int32_t nlines = diag_lines(ff, bw, lines);
    for (uint32_t c = 0; c < channels; c++)
        diag_channel_eval(davg[c], floors[c], top, bw, ff, lines, nlines, dg.count, &out[c]);
}

/* ---- baseline and score ---------------------------------------------------------------------- */

static double ln(double v) { return ap_ln(v + LOG_TINY); }

/* Robust and scale-free where possible: ln of the amplitudes (rms, velocity, peak, envelope
 * amplitudes, band energies), the shape factors and envelope ratios as they are. 22 values per
 * channel; with 3 or 4 channels the 8 bands merge into 4 or 2 so the vector fits 64 values.
 * is_log marks the ln entries (their spread floor is min_spread itself: a relative change). */
static int32_t baseline_vector(const channel_result *res, uint32_t channels, double *v, uint8_t *is_log) {
    int32_t per, groups, j = 0;
    layout(channels, &per, &groups);
    for (uint32_t c = 0; c < channels; c++) {
        const channel_result *r = &res[c];
        double lin[] = {r->crest, r->kurtosis, r->skewness};
        double lg[] = {r->rms, r->velocity, r->peak};
        for (int i = 0; i < 3; i++) { if (is_log) is_log[j] = 1; v[j++] = ln(lg[i]); }
        for (int i = 0; i < 3; i++) { if (is_log) is_log[j] = 0; v[j++] = lin[i]; }
        for (int k = 0; k < N_KINDS; k++) { if (is_log) is_log[j] = 1; v[j++] = ln(r->env_amp[k]); }
        for (int k = 0; k < N_KINDS; k++) { if (is_log) is_log[j] = 0; v[j++] = r->env_ratio[k]; }
        int32_t width = 8 / groups;
        for (int32_t g = 0; g < groups; g++) {
            double e2 = 0;
            for (int32_t b = g * width; b < (g + 1) * width; b++) e2 += r->bands[b] * r->bands[b];
            if (is_log) is_log[j] = 1;
            v[j++] = ln(ap_sqrt(e2));
        }
    }
    return j;
}

static void finish_baseline(int32_t nfeat, const uint8_t *is_log) {
    int32_t w = cfg.baseline_windows;
    for (int32_t i = 0; i < nfeat; i++) {
        for (int32_t r = 0; r < w; r++) column[r] = rows[r][i];
        double med = ap_median_f64(column, w);
        for (int32_t r = 0; r < w; r++) column[r] = ap_fabs(rows[r][i] - med);
        double spread = 1.4826 * ap_median_f64(column, w);
        double floor = is_log[i] ? cfg.min_spread : cfg.min_spread * ap_fabs(med);
        if (spread < floor) spread = floor;
        if (spread < 1e-9) spread = 1e-9;
        blob.median[i] = med;
        blob.spread[i] = spread;
    }
    blob.learned = 1;
    blob.channels = st.channels;
    blob.frames = st.frames;
    blob.nfeat = (uint32_t)nfeat;
    blob.params_hash = params_hash(st.channels, st.frames, (uint32_t)nfeat);
}

static int32_t severity_for(double score) {
    if (score >= 4 * cfg.threshold) return AP_SEV_CRITICAL;
    if (score >= 2 * cfg.threshold) return AP_SEV_ALARM;
    return AP_SEV_WARNING;
}

/* ---- reporting ------------------------------------------------------------------------------ */

/* A window's features go to the host in one ap_features batch, in this order: the fault
 * frequencies, each channel's features, iso_zone, then baseline.progress while learning or the
 * score and diagnosis. The names depend only on the channel count and the phase, so the packed
 * names are built once per shape. */
static const char *const head_names[] = {"shaft_hz", "bpfo_hz", "bpfi_hz", "bsf_hz", "ftf_hz"};
static const char *const learning_names[] = {"iso_zone", "baseline.progress"};
static const char *const scoring_names[] = {
    "iso_zone", "score", "diagnosis", "diagnosis.confidence", "diagnosis.peak_hz", "diagnosis.method",
    "diagnosis.windows", "diagnosis.band_lo_hz", "diagnosis.band_hi_hz", "conf.outer", "conf.inner", "conf.ball",
    "conf.cage"};
#define N_SCORING 13

/* Per-channel feature names, in report order; "ch<c>." is prefixed once, in ap_init. */
#define N_CH_FEATURES 23
static const char *const ch_feature_names[N_CH_FEATURES] = {
    "rms", "peak", "crest", "kurtosis", "skewness", "velocity_rms",
    "band0", "band1", "band2", "band3", "band4", "band5", "band6", "band7",
    "env.outer", "env.inner", "env.ball", "env.cage",
    "env.outer.ratio", "env.inner.ratio", "env.ball.ratio", "env.cage.ratio", "env.floor"};
static char ch_names[AP_MAX_CHANNELS][N_CH_FEATURES][24];
static int32_t ch_name_len[AP_MAX_CHANNELS][N_CH_FEATURES];

static void make_names(void) {
    for (uint32_t c = 0; c < AP_MAX_CHANNELS; c++)
        for (int i = 0; i < N_CH_FEATURES; i++) {
            ap_text t = {ch_names[c][i], sizeof ch_names[c][i], 0};
            ap_text_str(&t, "ch");
            ap_text_int(&t, c);
            ap_text_str(&t, ".");
            ap_text_str(&t, ch_feature_names[i]);
            ch_name_len[c][i] = t.len;
        }
}

#define BATCH_MAX (5 + AP_MAX_CHANNELS * N_CH_FEATURES + N_SCORING)
static char batch_names[BATCH_MAX * 24];
static int32_t batch_names_len, batch_count, batch_key = -1;
static double batch_values[BATCH_MAX];

static void batch_add_name(const char *name, int32_t len) {
    for (int32_t i = 0; i < len; i++) batch_names[batch_names_len++] = name[i];
    batch_names[batch_names_len++] = 0;
    batch_count++;
}

/* The packed names for this shape and phase; values go to batch_values in the same order. */
static void batch_prepare(uint32_t channels, int learning) {
    int32_t key = (int32_t)channels * 2 + learning;
    if (key == batch_key) return;
    batch_names_len = batch_count = 0;
    for (int i = 0; i < 5; i++) batch_add_name(head_names[i], ap_strlen(head_names[i]));
    for (uint32_t c = 0; c < channels; c++)
        for (int i = 0; i < N_CH_FEATURES; i++) batch_add_name(ch_names[c][i], ch_name_len[c][i]);
    int32_t tail = learning ? 2 : N_SCORING;
    for (int32_t i = 0; i < tail; i++) {
        const char *name = learning ? learning_names[i] : scoring_names[i];
        batch_add_name(name, ap_strlen(name));
    }
    batch_key = key;
}

static void channel_values(const channel_result *r, double *v) {
    v[0] = r->rms; v[1] = r->peak; v[2] = r->crest; v[3] = r->kurtosis; v[4] = r->skewness;
    v[5] = r->velocity;
    for (int b = 0; b < 8; b++) v[6 + b] = r->bands[b];
    for (int k = 0; k < N_KINDS; k++) { v[14 + k] = r->env_amp[k]; v[18 + k] = r->env_ratio[k]; }
    v[22] = r->env_floor;
}

static channel_result res[AP_MAX_CHANNELS];

int32_t ap_process(const uint8_t *window, int32_t len) {
    const ap_window_header *h = ap_window_open(window, len);
    if (!h) { ap_log(AP_LOG_ERROR, "malformed window header"); return -1; }
    uint32_t channels = h->channels;
    int32_t n = (int32_t)h->frames;
    if (channels > AP_MAX_CHANNELS) { ap_log(AP_LOG_ERROR, "too many channels (max 4)"); return -2; }
    if (h->frames > N_MAX || !ap_is_pow2(n)) {
        ap_log(AP_LOG_ERROR, "frames per window must be a power of two from 4 to 16384");
        return -2;
    }
    double fs = h->sample_rate;
    if (!(fs > 0) || !ap_isfinite(fs)) { ap_log(AP_LOG_ERROR, "sample rate must be positive"); return -3; }
    double env_lo = cfg.env_lo_set ? cfg.env_lo : fs / 8, env_hi = cfg.env_hi_set ? cfg.env_hi : 3 * fs / 8;
    if (!(env_lo > 0 && env_lo < env_hi && env_hi < fs / 2)) {
        ap_log(AP_LOG_ERROR, "envelope band must satisfy 0 < envelope.low_hz < envelope.high_hz < fs/2");
        return -3;
    }
    double bw = fs / n;

    /* All channels at once, phase by phase (the planar window is already one batch). */
    if (!time_stats(ap_window_channel(h, 0), n, channels, res)) {
        /* A NaN or inf sample (a sensor glitch) must not poison the baseline. */
        ap_log(AP_LOG_WARNING, "window holds non-finite samples; skipped");
        return -4;
    }
    ap_rfft_batch(xd, spec, n, (int32_t)channels);
    fault_freqs ff;         /* the shaft speed comes from channel 0 (ap_window_open ensures one) */
    double fr_window = cfg.fixed_rpm ? cfg.rpm / 60 : estimate_shaft(spec, n, bw, cfg.rpm_min / 60, cfg.rpm_max / 60);
    fault_frequencies(cfg.fixed_rpm ? fr_window : track_shaft(fr_window), &ff);
    spectral_stats(n, channels, bw, res);
    envelope_spectra(n, channels, bw, env_lo, env_hi);
    int32_t upto = amp_bins(n, bw, &ff);
    for (uint32_t c = 0; c < channels; c++) envelope_amplitudes(espec + (size_t)c * (n + 2), n, upto, amp[c]);
    double floors[AP_MAX_CHANNELS];
    envelope_floors(n, channels, bw, &ff, floors);
    for (uint32_t c = 0; c < channels; c++)
        envelope_faults(espec + (size_t)c * (n + 2), amp[c], floors[c], n, bw, &ff, &res[c]);

    double *fv = batch_values;
    fv[0] = ff.fr; fv[1] = ff.bpfo; fv[2] = ff.bpfi; fv[3] = ff.bsf; fv[4] = ff.ftf;
    double vmax = 0;
    for (uint32_t c = 0; c < channels; c++) {
        channel_values(&res[c], fv + 5 + c * N_CH_FEATURES);
        if (res[c].velocity > vmax) vmax = res[c].velocity;
    }
    double *tail = fv + 5 + channels * N_CH_FEATURES;
    const double *zb = iso_bounds[cfg.iso_group - 1][cfg.iso_flexible];
    int32_t zone = vmax < zb[0] ? 0 : vmax < zb[1] ? 1 : vmax < zb[2] ? 2 : 3;
    tail[0] = zone;

    /* The baseline belongs to one window shape; a new shape (reconfigured source) relearns. */
    if (st.channels && (st.channels != channels || st.frames != (uint32_t)n)) {
        ap_log(AP_LOG_WARNING, "window shape changed: relearning the baseline");
        reset_learning();
    }
    if (!st.channels) { st.channels = channels; st.frames = (uint32_t)n; }

    double v[MAX_FEATURES];
    uint8_t is_log[MAX_FEATURES];
    int32_t nfeat = baseline_vector(res, channels, v, is_log);
    if (st.learned < cfg.baseline_windows) {
        for (int32_t i = 0; i < nfeat; i++) rows[st.learned][i] = v[i];
        st.learned++;
        tail[1] = (double)st.learned / cfg.baseline_windows;
        batch_prepare(channels, 1);
        ap_features(batch_names, batch_names_len, batch_values, batch_count);
        if (st.learned == cfg.baseline_windows) {
            finish_baseline(nfeat, is_log);
            ap_log(AP_LOG_INFO, "baseline learned");
            ap_host_state_changed();
        }
        return 0;
    }

    double sum = 0;
    for (int32_t i = 0; i < nfeat; i++) {
        double z = (v[i] - blob.median[i]) / blob.spread[i];
        sum += z * z;
    }
    double score = ap_sqrt(sum / nfeat);
    tail[1] = score;

    int32_t sev = severity_for(score);
    int what = ap_story_update(&st.story, score, cfg.threshold, sev, cfg.confirm, cfg.clear_ratio, cfg.clear_windows);

    /* Diagnosis while the window is anomalous or its story open (see "diagnosis" above). */
    diag_channel dc[AP_MAX_CHANNELS];
    fault_freqs dff = ff;                       /* the diagnosis's own (see diag_update) */
    double conf[N_KINDS] = {0};
    int best = 0, runner = 1, named = 0, show = 0;
    uint32_t best_c = 0, show_c = 0;
    if (score >= cfg.threshold || st.story.active >= 0) {
        diag_update(n, channels, bw, fs, env_lo, env_hi, fr_window, &dff, dc);
        for (int k = 0; k < N_KINDS; k++)
            for (uint32_t c = 0; c < channels; c++) if (dc[c].conf[k] > conf[k]) conf[k] = dc[c].conf[k];
        for (int k = 1; k < N_KINDS; k++) if (conf[k] > conf[best]) best = k;
        runner = best == 0 ? 1 : 0;
        for (int k = 0; k < N_KINDS; k++) if (k != best && conf[k] > conf[runner]) runner = k;
        for (uint32_t c = 1; c < channels; c++) if (dc[c].conf[best] > dc[best_c].conf[best]) best_c = c;
        named = conf[best] >= cfg.min_conf && conf[best] - conf[runner] >= cfg.margin;
        /* The line the event shows: the named part's, else the most prominent fault line. */
        show = best;
        show_c = best_c;
        if (!named)
            for (uint32_t c = 0; c < channels; c++)
                for (int k = 0; k < N_KINDS; k++)
                    if (dc[c].peak_ratio[k] > dc[show_c].peak_ratio[show]) { show = k; show_c = c; }
    } else {
        diag_reset();
    }
    int diagnosing = dg.count > 0;
    tail[2] = named ? best + 1 : 0;
    tail[3] = conf[best];
    tail[4] = diagnosing ? dc[show_c].peak_hz[show] : 0;
    tail[5] = named ? 1 : 0;                    /* 1: the envelope signature named it */
    tail[6] = dg.count;
    tail[7] = diagnosing ? dg.k0[show_c] * bw : 0;
    tail[8] = diagnosing ? (dg.k1[show_c] + 1) * bw : 0;
    for (int k = 0; k < N_KINDS; k++) tail[9 + k] = conf[k];
    batch_prepare(channels, 0);
    ap_features(batch_names, batch_names_len, batch_values, batch_count);
    if (what == AP_STORY_CLEAR) diag_reset();

    static const char zones[] = "ABCD";
    char zone_txt[2] = {zones[zone], 0};
    char msg[480];
    ap_text t = {msg, sizeof msg, 0};
    if (what == AP_STORY_RAISE || what == AP_STORY_ESCALATE) {
        ap_text_str(&t, what == AP_STORY_RAISE ? "bearing anomaly (score " : "bearing anomaly escalated (score ");
        ap_text_num(&t, score, 1);
        ap_text_str(&t, ", ISO zone ");
        ap_text_str(&t, zone_txt);
        ap_text_str(&t, ", velocity ");
        ap_text_num(&t, vmax, 2);
        ap_text_str(&t, " mm/s): ");
        const diag_channel *d = &dc[show_c];
        if (named) {
            ap_text_str(&t, kind_words[best]);
            ap_text_str(&t, " (confidence ");
            ap_text_num(&t, conf[best], 2);
            ap_text_str(&t, ", envelope signature over ");
            ap_text_int(&t, dg.count);
            ap_text_str(&t, dg.count == 1 ? " window): " : " windows): ");
        } else {
            ap_text_str(&t, "unspecified (no part's signature is clear enough; most prominent fault line: ");
        }
        ap_text_str(&t, kind_freq[show]);
        ap_text_str(&t, " ");
        ap_text_num(&t, dff.f[show], 1);
        ap_text_str(&t, " Hz, line at ");
        ap_text_num(&t, d->peak_hz[show], 1);
        ap_text_str(&t, " Hz ");
        ap_text_num(&t, d->peak_ratio[show], 1);
        ap_text_str(&t, "x the floor on ch");
        ap_text_int(&t, show_c);
        ap_text_str(&t, named ? "; other candidates: " : "; candidates: ");
        /* the other candidates, highest confidence first (stable: ties keep the kind order) */
        int order[N_KINDS], no = 0;
        for (int j = 0; j < N_KINDS; j++) if (!(named && j == best)) order[no++] = j;
        for (int i = 1; i < no; i++)
            for (int j = i; j > 0 && conf[order[j]] > conf[order[j - 1]]; j--) {
                int tmp = order[j]; order[j] = order[j - 1]; order[j - 1] = tmp;
            }
        for (int i = 0; i < no; i++) {
            if (i) ap_text_str(&t, ", ");
            ap_text_str(&t, kind_words[order[i]]);
            ap_text_str(&t, " ");
            ap_text_num(&t, conf[order[i]], 2);
        }
        if (!named) ap_text_str(&t, ")");
        ap_event(sev, score, msg);
    } else if (what == AP_STORY_CLEAR) {
        ap_text_str(&t, "bearing vibration back to baseline (score ");
        ap_text_num(&t, score, 1);
        ap_text_str(&t, ", ISO zone ");
        ap_text_str(&t, zone_txt);
        ap_text_str(&t, ")");
        ap_event(AP_SEV_INFO, score, msg);
    }
    return 0;
}
