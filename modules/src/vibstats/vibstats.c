/*
 * vibstats: vibration statistics with a learned baseline.
 *
 * Per channel and window: RMS and peak of the AC part (mean removed), crest factor, kurtosis.
 * The first `baseline.windows` windows learn each feature's mean and spread (Welford). After
 * that the anomaly score is the largest |z| over channels and features. An event is raised when
 * the score stays above `threshold` for `confirm` windows, raised again only when the severity
 * escalates, and a clearing event follows once the score has stayed below
 * `threshold * clear_ratio` for `clear_windows` windows: one fault, one event story.
 *
 * Params (see configs/appliance.yaml):
 *   baseline.windows  windows to learn from            (default 40)
 *   threshold         score that means anomalous        (default 6)
 *   confirm           windows above threshold to raise  (default 2)
 *   clear_ratio       fraction of threshold to clear    (default 0.7)
 *   clear_windows     windows below that to clear       (default 5)
 *   min_spread        relative floor of a feature's spread, so a very steady baseline does
 *                     not turn noise into huge scores   (default 0.05)
 */
#define AP_MAX_CHANNELS 8
#define AP_MAX_FRAMES 16384
#define AP_WINDOW_BYTES (64 + 4 * AP_MAX_CHANNELS * AP_MAX_FRAMES)
#include "ap_module.h"
#include "ap_dsp.h"     /* ap_features: a window's statistics in one host call */

enum { F_RMS, F_PEAK, F_CREST, F_KURTOSIS, N_FEATURES };
static const char *const feature_names[N_FEATURES] = {"rms", "peak", "crest", "kurtosis"};

static struct {
    int32_t baseline_windows, confirm, clear_windows;
    double threshold, clear_ratio, min_spread;
} cfg;

static struct {
    int32_t learned;                              /* windows learned so far */
    uint32_t channels;
    double mean[AP_MAX_CHANNELS][N_FEATURES];
    double m2[AP_MAX_CHANNELS][N_FEATURES];
    ap_story story;                               /* the event story (ap_module.h) */
} st;

static int param_error(const char *what) {
    ap_log(AP_LOG_ERROR, what);
    return 1;
}

int32_t ap_init(const char *params, int32_t len) {
    if (ap_params_check(params, len)) return 1;   /* a key not in module.yaml's params */
    ap_dsp_init(params, len);
    int bad = 0;
    cfg.baseline_windows = (int32_t)ap_param_f64(params, len, "baseline.windows", 40, &bad);
    cfg.threshold = ap_param_f64(params, len, "threshold", 6.0, &bad);
    cfg.confirm = (int32_t)ap_param_f64(params, len, "confirm", 2, &bad);
    cfg.clear_ratio = ap_param_f64(params, len, "clear_ratio", 0.7, &bad);
    cfg.clear_windows = (int32_t)ap_param_f64(params, len, "clear_windows", 5, &bad);
    cfg.min_spread = ap_param_f64(params, len, "min_spread", 0.05, &bad);
    if (bad) return param_error("a param is not a number");
    if (cfg.baseline_windows < 2) return param_error("baseline.windows must be at least 2");
    if (cfg.threshold <= 0) return param_error("threshold must be positive");
    if (cfg.confirm < 1 || cfg.clear_windows < 1) return param_error("confirm and clear_windows must be at least 1");
    if (cfg.clear_ratio <= 0 || cfg.clear_ratio > 1) return param_error("clear_ratio must be in (0, 1]");
    if (cfg.min_spread < 0) return param_error("min_spread must not be negative");
    st.learned = 0;
    st.channels = 0;
    ap_story_reset(&st.story);
    return 0;
}

/* The loops run in runs of RUN samples, each run one straight line: wasmtime checks its epoch at
 * every loop head and Cranelift then keeps the sums in stack slots across it, which put a store
 * and a reload into every sample's chain of additions. The same additions in the same order. */
#define RUN 8

static inline void moments(double d, double *m2, double *m4, double *peak) {
    double d2 = d * d;
    *m2 += d2;
    *m4 += d2 * d2;
    double a = ap_fabs(d);
    if (a > *peak) *peak = a;
}

static void channel_features(const float *x, uint32_t n, double out[N_FEATURES]) {
    double sum = 0;
    uint32_t i = 0;
    for (; i + RUN <= n; i += RUN)
        for (uint32_t j = i; j < i + RUN; j++) sum += x[j];
    for (; i < n; i++) sum += x[i];
    double mean = sum / n, m2 = 0, m4 = 0, peak = 0;
    for (i = 0; i + RUN <= n; i += RUN)
        for (uint32_t j = i; j < i + RUN; j++) moments(x[j] - mean, &m2, &m4, &peak);
    for (; i < n; i++) moments(x[i] - mean, &m2, &m4, &peak);
    m2 /= n;
    m4 /= n;
    double rms = ap_sqrt(m2);
    out[F_RMS] = rms;
    out[F_PEAK] = peak;
    out[F_CREST] = rms > 0 ? peak / rms : 0;
    out[F_KURTOSIS] = m2 > 0 ? m4 / (m2 * m2) : 0;
}

/* A window's statistics go to the host in one ap.features call where the host offers it
 * (host.dsp=1, ap_dsp.h's ap_features), not one ap.feature call each (twelve for three
 * channels): a host call costs more than the statistics of a channel on wasmtime. The names are
 * made once. */

static char batch_names[AP_MAX_CHANNELS * N_FEATURES * 16];   /* "ch0.rms\0ch0.peak\0..." */
static int32_t batch_names_len;
static uint32_t batch_channels;

static void report_features(uint32_t channels, const double feat[][N_FEATURES]) {
    if (batch_channels != channels) {
        ap_text t = {batch_names, sizeof batch_names, 0};
        for (uint32_t c = 0; c < channels; c++)
            for (int f = 0; f < N_FEATURES; f++) {
                ap_text_str(&t, "ch");
                ap_text_int(&t, c);
                ap_text_str(&t, ".");
                ap_text_str(&t, feature_names[f]);
                t.len++;                          /* keep the 0 byte ap_text wrote after the name */
            }
        batch_names_len = t.len;
        batch_channels = channels;
    }
    ap_features(batch_names, batch_names_len, &feat[0][0], (int32_t)(channels * N_FEATURES));
}

static int32_t severity_for(double score) {
    if (score >= 4 * cfg.threshold) return AP_SEV_CRITICAL;
    if (score >= 2 * cfg.threshold) return AP_SEV_ALARM;
    return AP_SEV_WARNING;
}

int32_t ap_process(const uint8_t *window, int32_t len) {
    const ap_window_header *h = ap_window_open(window, len);
    if (!h) { ap_log(AP_LOG_ERROR, "malformed window header"); return -1; }
    if (h->channels > AP_MAX_CHANNELS) { ap_log(AP_LOG_ERROR, "too many channels (max 8)"); return -2; }
    if (st.channels == 0) st.channels = h->channels;
    if (h->channels != st.channels) { ap_log(AP_LOG_ERROR, "channel count changed"); return -3; }

    double feat[AP_MAX_CHANNELS][N_FEATURES];
    for (uint32_t c = 0; c < h->channels; c++) {
        channel_features(ap_window_channel(h, c), h->frames, feat[c]);
        for (int f = 0; f < N_FEATURES; f++) {
            /* A NaN or inf sample (a sensor glitch) must not poison the baseline: skip the window. */
            if (!ap_isfinite(feat[c][f])) {
                ap_log(AP_LOG_WARNING, "window holds non-finite samples; skipped");
                return -4;
            }
        }
    }
    report_features(h->channels, (const double (*)[N_FEATURES])feat);

    if (st.learned < cfg.baseline_windows) {
        st.learned++;
        for (uint32_t c = 0; c < h->channels; c++)
            for (int f = 0; f < N_FEATURES; f++) {
                double d = feat[c][f] - st.mean[c][f];
                st.mean[c][f] += d / st.learned;
                st.m2[c][f] += d * (feat[c][f] - st.mean[c][f]);
            }
        ap_feature("baseline.progress", (double)st.learned / cfg.baseline_windows);
        if (st.learned == cfg.baseline_windows) ap_log(AP_LOG_INFO, "baseline learned");
        return 0;
    }

    double score = 0;
    uint32_t worst_c = 0;
    int worst_f = 0;
    for (uint32_t c = 0; c < h->channels; c++)
        for (int f = 0; f < N_FEATURES; f++) {
            double mean = st.mean[c][f];
            double spread = ap_sqrt(st.m2[c][f] / (st.learned - 1));
            double floor = cfg.min_spread * ap_fabs(mean);
            if (spread < floor) spread = floor;
            if (spread < 1e-12) spread = 1e-12;
            double z = ap_fabs(feat[c][f] - mean) / spread;
            if (z > score) { score = z; worst_c = c; worst_f = f; }
        }
    ap_feature("score", score);

    int32_t sev = severity_for(score);
    char msg[160];
    ap_text t = {msg, sizeof msg, 0};
    int what = ap_story_update(&st.story, score, cfg.threshold, sev, cfg.confirm, cfg.clear_ratio, cfg.clear_windows);
    if (what == AP_STORY_RAISE || what == AP_STORY_ESCALATE) {
        ap_text_str(&t, what == AP_STORY_RAISE ? "vibration anomaly: ch" : "vibration anomaly escalated: ch");
        ap_text_int(&t, worst_c);
        ap_text_str(&t, " ");
        ap_text_str(&t, feature_names[worst_f]);
        ap_text_str(&t, " ");
        ap_text_num(&t, feat[worst_c][worst_f], 4);
        ap_text_str(&t, " vs baseline ");
        ap_text_num(&t, st.mean[worst_c][worst_f], 4);
        ap_text_str(&t, " (score ");
        ap_text_num(&t, score, 1);
        ap_text_str(&t, ")");
        ap_event(sev, score, msg);
    } else if (what == AP_STORY_CLEAR) {
        ap_text_str(&t, "vibration back to baseline (score ");
        ap_text_num(&t, score, 1);
        ap_text_str(&t, ")");
        ap_event(AP_SEV_INFO, score, msg);
    }
    return 0;
}
