/*
 * process: rules on slow process values (Modbus registers, NMEA fields), per signal and per
 * sample, with hysteresis and the recent history as evidence. docs/modules/process.md is the
 * reference; in short:
 *
 *   signal.N.*   rules for the window's channel N (0..31): range (min/max), rate of change
 *                (rate_max, units per second), stuck (stuck_samples within stuck_tolerance),
 *                drift (CUSUM: drift.k/drift.h, or EWMA: drift.ewma/drift.limit, around
 *                drift.target or a target learned from the first drift.learn samples) and
 *                no data (more than missing_max NaN samples in a row)
 *   gps.*        channel indices of fix quality / latitude / longitude; loss of fix
 *                (fix_lost_samples without a fix) and position jump (max_speed_mps)
 *
 * Windows: every rule sees each sample once. Consecutive windows may overlap (hop < size); the
 * module recognises the overlap (from the sample clock, start_time_ns, checked against the
 * samples themselves, or from the samples alone when the clock says nothing) and evaluates only
 * the new samples. A sequence gap (dropped windows), a jump of the clock or windows that do not
 * continue each other restart the per-signal short-term state (previous value, stuck run, NaN
 * run, GPS fix history).
 *
 * Per (signal, rule): one event when the rule starts failing, one info event ("back to normal")
 * once it has passed for clear_samples samples in a row. NaN samples are neither pass nor fail
 * except for the no-data rule.
 */
#define MAX_SIGNALS 32
#define MAX_FRAMES 4096
#define MAX_WINDOW_SAMPLES 131072
#define AP_WINDOW_BYTES (64 + 4 * MAX_WINDOW_SAMPLES)
#include "ap_module.h"

#define HIST 8                 /* samples of evidence per signal */
#define MAX_EVENTS 16          /* the host's limit per window (ABI.md) */
#define MAX_FEATURES 250       /* evidence features per window; the host's limit is 256 (3 more
                                  are reported per window) */
#define NAME_MAX 24

enum { R_RANGE, R_RATE, R_STUCK, R_DRIFT, R_MISSING, N_SIG_RULES };
enum { G_FIX, G_JUMP, N_GPS_RULES };
static const char *const sig_rule_key[N_SIG_RULES] = {"range", "rate", "stuck", "drift", "missing"};
static const char *const sig_rule_text[N_SIG_RULES] = {"out of range", "rate of change", "stuck", "drift",
                                                       "no data"};
static const char *const gps_rule_key[N_GPS_RULES] = {"fix_lost", "jump"};
static const char *const gps_rule_text[N_GPS_RULES] = {"loss of fix", "position jump"};
static const char *const severity_names[4] = {"info", "warning", "alarm", "critical"};

enum { V_NONE, V_PASS, V_FAIL };
enum { DRIFT_OFF, DRIFT_CUSUM, DRIFT_EWMA };
enum { DIR_UP = 1, DIR_DOWN = 2, DIR_BOTH = 3 };

#define EARTH_RADIUS_M 6371008.8
#define PI 3.14159265358979323846

/* ---- configuration ------------------------------------------------------------------------ */

typedef struct {
    int used;
    char name[NAME_MAX + 1];
    int decimals, clear_samples;
    int has_min, has_max;
    double min, max;
    double rate_max;                 /* 0: rule off */
    int32_t stuck_samples;           /* 0: rule off */
    int has_tol;
    double stuck_tol;
    int32_t missing_max;             /* -1: rule off */
    int drift, drift_dir;
    int has_target, has_k, has_h, has_lambda, has_limit, has_dir;
    double target, k, h, lambda, limit;
    int32_t learn;                   /* 0: fixed target */
    int32_t severity[N_SIG_RULES];   /* -1: the global default */
} sig_cfg;

static struct {
    int clear_samples, decimals;
    int32_t severity[N_SIG_RULES + N_GPS_RULES];   /* global defaults, signal rules then GPS rules */
    sig_cfg sig[MAX_SIGNALS];
    int nsig;
    /* GPS */
    int gps_used;
    char gps_name[NAME_MAX + 1];
    int32_t fix_ch, lat_ch, lon_ch;  /* -1: not given */
    int32_t fix_lost_samples;        /* 0: rule off */
    double max_speed;                /* 0: rule off */
    int gps_clear_samples;
    int32_t gps_severity[N_GPS_RULES];
    /* channels any rule reads */
    int32_t watch[MAX_SIGNALS];
    int nwatch;
    int32_t max_channel;
} cfg;

/* ---- state -------------------------------------------------------------------------------- */

typedef struct {
    uint8_t active;
    int32_t passes;
    uint32_t deferred_in;            /* the window in which a transition last had to wait */
} rule_state;

typedef struct {
    float hist[HIST];
    int32_t hist_n, hist_pos;
    int has_prev;                    /* rate: previous finite sample */
    double prev;
    int32_t prev_steps;              /* sample intervals from prev to the next sample */
    int32_t run;                     /* stuck: finite samples within the band */
    double run_lo, run_hi;
    int run_from_change;             /* the run began because the value moved */
    int32_t nan_run;
    int32_t learned;                 /* drift */
    double learn_sum, target;
    int target_ok;
    double sp, sn, ewma;
    rule_state rs[N_SIG_RULES];
} sig_state;

typedef struct {
    float qhist[HIST];
    int32_t qhist_n, qhist_pos;
    float vhist[HIST];               /* fix-to-fix speeds, m/s */
    int32_t vhist_n, vhist_pos;
    int32_t nofix_run;
    int has_fix;
    double lat, lon;
    int32_t steps;                   /* sample intervals since the last fix */
    rule_state rs[N_GPS_RULES];
} gps_state;

static sig_state ss[MAX_SIGNALS];
static gps_state gs;

static struct {
    int have;
    uint64_t seq;
    int64_t start_ns;
    uint32_t frames;
    double rate;
    uint32_t known_hop;
} pw;
static float prev_win[MAX_SIGNALS][MAX_FRAMES];

static struct {
    uint32_t count;                  /* windows processed */
    int events, features, deferred;
    double rate;                     /* the window's sample rate, Hz */
} win;
static int warned_channels, warned_frames;

/* ---- small helpers -------------------------------------------------------------------------- */

static inline uint32_t f32_bits(float f) {
    union { float f; uint32_t u; } x;
    x.f = f;
    return x.u;
}

static int str_eq(const char *a, int alen, const char *b) {
    int i = 0;
    for (; i < alen; i++)
        if (b[i] != a[i]) return 0;
    return b[i] == 0;
}

static int starts_with(const char *a, int alen, const char *prefix) {
    int i = 0;
    for (; prefix[i]; i++)
        if (i >= alen || a[i] != prefix[i]) return 0;
    return 1;
}

/* A number with `dec` decimals, trailing zeros dropped: 93.40 -> 93.4, 90.00 -> 90. */
static void put_num(ap_text *t, double v, int dec) {
    if (v != v) { ap_text_str(t, "nan"); return; }
    if (!ap_isfinite(v)) { ap_text_str(t, v > 0 ? "inf" : "-inf"); return; }
    double scale = 1;
    for (int i = 0; i < dec; i++) scale *= 10;
    if (ap_fabs(v) * scale < 0.5) v = 0;          /* no "-0" */
    char tmp[48];
    ap_text u = {tmp, sizeof tmp, 0};
    ap_text_num(&u, v, dec);
    int dot = 0;
    for (int i = 0; i < u.len; i++)
        if (tmp[i] == '.') dot = 1;
    if (dot) {
        while (u.len > 0 && tmp[u.len - 1] == '0') u.len--;
        if (u.len > 0 && tmp[u.len - 1] == '.') u.len--;
        tmp[u.len] = 0;
    }
    ap_text_str(t, tmp);
}

static void put_span(ap_text *t, const char *s, int n) {
    for (int i = 0; i < n && t->len < t->cap - 1; i++) t->buf[t->len++] = s[i];
    if (t->cap > 0) t->buf[t->len] = 0;
}

/* cos of x radians, |x| <= pi/2 (latitudes), Taylor to x^18: error below 1e-12. */
static double cos_small(double x) {
    double x2 = x * x, term = 1, sum = 1;
    for (int n = 1; n <= 9; n++) {
        term *= -x2 / ((2 * n - 1) * (2 * n));
        sum += term;
    }
    return sum;
}

/* Distance in metres between two positions (degrees), equirectangular: the local flat-earth
 * approximation at the mean latitude. Within 0.04 % of the haversine distance up to 100 km below
 * 80 degrees of latitude, 3.5 % at 1000 km (docs/modules/process.md): far finer than the speed
 * limit a jump is judged by. */
static double distance_m(double lat1, double lon1, double lat2, double lon2) {
    double dlon = lon2 - lon1;
    while (dlon > 180) dlon -= 360;
    while (dlon < -180) dlon += 360;
    double mid = (lat1 + lat2) * 0.5 * PI / 180;
    double x = dlon * PI / 180 * cos_small(mid);
    double y = (lat2 - lat1) * PI / 180;
    return EARTH_RADIUS_M * ap_sqrt(x * x + y * y);
}

/* ---- params --------------------------------------------------------------------------------- */

static char errbuf[400];

static int reject(const char *msg) {
    ap_log(AP_LOG_ERROR, msg);
    return 1;
}

/* "what: problem" with `what` given as a span (a key from the params text). */
static int reject_key(const char *key, int klen, const char *problem) {
    ap_text t = {errbuf, sizeof errbuf, 0};
    put_span(&t, key, klen);
    ap_text_str(&t, ": ");
    ap_text_str(&t, problem);
    return reject(errbuf);
}

static int parse_num(const char *key, int klen, const char *v, int vlen, double *out) {
    int ok;
    *out = ap_parse_f64(v, vlen, &ok);
    if (!ok) return reject_key(key, klen, "not a number");
    return 0;
}

static int parse_count(const char *key, int klen, const char *v, int vlen, int32_t lo, int32_t *out) {
    double x;
    if (parse_num(key, klen, v, vlen, &x)) return 1;
    if (x != (double)(int64_t)x) return reject_key(key, klen, "must be a whole number");
    if (x < lo) {
        ap_text t = {errbuf, sizeof errbuf, 0};
        put_span(&t, key, klen);
        ap_text_str(&t, ": ");
        put_num(&t, x, 6);
        ap_text_str(&t, lo == 0 ? " is negative" : " is below ");
        if (lo != 0) ap_text_int(&t, lo);
        return reject(errbuf);
    }
    if (x > 1e9) return reject_key(key, klen, "is too large");
    *out = (int32_t)x;
    return 0;
}

static int parse_index(const char *key, int klen, const char *v, int vlen, int32_t *out) {
    if (parse_count(key, klen, v, vlen, 0, out)) return 1;
    if (*out >= MAX_SIGNALS) return reject_key(key, klen, "channel index beyond 31 (at most 32 channels)");
    return 0;
}

static int parse_severity(const char *key, int klen, const char *v, int vlen, int32_t *out) {
    for (int i = 0; i < 4; i++)
        if (str_eq(v, vlen, severity_names[i])) { *out = i; return 0; }
    if (vlen == 1 && v[0] >= '0' && v[0] <= '3') { *out = v[0] - '0'; return 0; }
    return reject_key(key, klen, "severity must be info, warning, alarm or critical (or 0..3)");
}

static int parse_name(const char *key, int klen, const char *v, int vlen, char *out) {
    if (vlen < 1 || vlen > NAME_MAX) return reject_key(key, klen, "a name has 1 to 24 characters");
    for (int i = 0; i < vlen; i++) {
        char c = v[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
                 c == '-' || c == ':' || (c == '.' && i > 0 && i < vlen - 1);
        if (!ok) return reject_key(key, klen, "a name uses only letters, digits and _ - : . (it names features)");
    }
    for (int i = 0; i < vlen; i++) out[i] = v[i];
    out[vlen] = 0;
    return 0;
}

/* The rule index of "severity.<rule>" (signal rules 0..4, GPS rules 5..6), or -1. */
static int severity_rule(const char *s, int n, int allow_sig, int allow_gps) {
    if (allow_sig)
        for (int r = 0; r < N_SIG_RULES; r++)
            if (str_eq(s, n, sig_rule_key[r])) return r;
    if (allow_gps)
        for (int r = 0; r < N_GPS_RULES; r++)
            if (str_eq(s, n, gps_rule_key[r])) return N_SIG_RULES + r;
    return -1;
}

static const char *const SIGNAL_KEYS =
    "(signal keys: name, min, max, rate_max, stuck_samples, stuck_tolerance, missing_max, drift.target, "
    "drift.learn, drift.k, drift.h, drift.ewma, drift.limit, drift.direction, decimals, clear_samples, "
    "severity.<range|rate|stuck|drift|missing>)";

static int signal_key(int idx, const char *key, int klen, const char *sub, int slen, const char *v, int vlen) {
    sig_cfg *s = &cfg.sig[idx];
    s->used = 1;
    if (str_eq(sub, slen, "name")) return parse_name(key, klen, v, vlen, s->name);
    if (str_eq(sub, slen, "min")) { s->has_min = 1; return parse_num(key, klen, v, vlen, &s->min); }
    if (str_eq(sub, slen, "max")) { s->has_max = 1; return parse_num(key, klen, v, vlen, &s->max); }
    if (str_eq(sub, slen, "rate_max")) {
        if (parse_num(key, klen, v, vlen, &s->rate_max)) return 1;
        if (!(s->rate_max > 0)) return reject_key(key, klen, "must be positive (units per second)");
        return 0;
    }
    if (str_eq(sub, slen, "stuck_samples")) {
        if (parse_count(key, klen, v, vlen, 0, &s->stuck_samples)) return 1;
        if (s->stuck_samples < 2) return reject_key(key, klen, "must be at least 2");
        return 0;
    }
    if (str_eq(sub, slen, "stuck_tolerance")) {
        s->has_tol = 1;
        if (parse_num(key, klen, v, vlen, &s->stuck_tol)) return 1;
        if (s->stuck_tol < 0) return reject_key(key, klen, "is negative");
        return 0;
    }
    if (str_eq(sub, slen, "missing_max")) return parse_count(key, klen, v, vlen, 0, &s->missing_max);
    if (str_eq(sub, slen, "decimals")) {
        int32_t d;
        if (parse_count(key, klen, v, vlen, 0, &d)) return 1;
        if (d > 9) return reject_key(key, klen, "at most 9");
        s->decimals = d;
        return 0;
    }
    if (str_eq(sub, slen, "clear_samples")) {
        int32_t c;
        if (parse_count(key, klen, v, vlen, 0, &c)) return 1;
        if (c < 1) return reject_key(key, klen, "must be at least 1");
        s->clear_samples = c;
        return 0;
    }
    if (starts_with(sub, slen, "severity.")) {
        int r = severity_rule(sub + 9, slen - 9, 1, 0);
        if (r < 0) return reject_key(key, klen, "unknown rule (range, rate, stuck, drift, missing)");
        return parse_severity(key, klen, v, vlen, &s->severity[r]);
    }
    if (starts_with(sub, slen, "drift.")) {
        const char *d = sub + 6;
        int dlen = slen - 6;
        if (str_eq(d, dlen, "target")) { s->has_target = 1; return parse_num(key, klen, v, vlen, &s->target); }
        if (str_eq(d, dlen, "learn")) {
            if (parse_count(key, klen, v, vlen, 0, &s->learn)) return 1;
            if (s->learn < 2) return reject_key(key, klen, "must be at least 2 samples");
            return 0;
        }
        if (str_eq(d, dlen, "k")) {
            s->has_k = 1;
            if (parse_num(key, klen, v, vlen, &s->k)) return 1;
            if (s->k < 0) return reject_key(key, klen, "is negative");
            return 0;
        }
        if (str_eq(d, dlen, "h")) {
            s->has_h = 1;
            if (parse_num(key, klen, v, vlen, &s->h)) return 1;
            if (!(s->h > 0)) return reject_key(key, klen, "must be positive");
            return 0;
        }
        if (str_eq(d, dlen, "ewma")) {
            s->has_lambda = 1;
            if (parse_num(key, klen, v, vlen, &s->lambda)) return 1;
            if (!(s->lambda > 0 && s->lambda <= 1)) return reject_key(key, klen, "must be in (0, 1]");
            return 0;
        }
        if (str_eq(d, dlen, "limit")) {
            s->has_limit = 1;
            if (parse_num(key, klen, v, vlen, &s->limit)) return 1;
            if (!(s->limit > 0)) return reject_key(key, klen, "must be positive");
            return 0;
        }
        if (str_eq(d, dlen, "direction")) {
            s->has_dir = 1;
            if (str_eq(v, vlen, "up")) s->drift_dir = DIR_UP;
            else if (str_eq(v, vlen, "down")) s->drift_dir = DIR_DOWN;
            else if (str_eq(v, vlen, "both")) s->drift_dir = DIR_BOTH;
            else return reject_key(key, klen, "must be up, down or both");
            return 0;
        }
    }
    ap_text t = {errbuf, sizeof errbuf, 0};
    ap_text_str(&t, "unknown param ");
    put_span(&t, key, klen);
    ap_text_str(&t, " ");
    ap_text_str(&t, SIGNAL_KEYS);
    return reject(errbuf);
}

static int gps_key(const char *key, int klen, const char *sub, int slen, const char *v, int vlen) {
    cfg.gps_used = 1;
    if (str_eq(sub, slen, "fix")) return parse_index(key, klen, v, vlen, &cfg.fix_ch);
    if (str_eq(sub, slen, "lat")) return parse_index(key, klen, v, vlen, &cfg.lat_ch);
    if (str_eq(sub, slen, "lon")) return parse_index(key, klen, v, vlen, &cfg.lon_ch);
    if (str_eq(sub, slen, "name")) return parse_name(key, klen, v, vlen, cfg.gps_name);
    if (str_eq(sub, slen, "fix_lost_samples")) {
        if (parse_count(key, klen, v, vlen, 0, &cfg.fix_lost_samples)) return 1;
        if (cfg.fix_lost_samples < 1) return reject_key(key, klen, "must be at least 1");
        return 0;
    }
    if (str_eq(sub, slen, "max_speed_mps")) {
        if (parse_num(key, klen, v, vlen, &cfg.max_speed)) return 1;
        if (!(cfg.max_speed > 0)) return reject_key(key, klen, "must be positive");
        return 0;
    }
    if (str_eq(sub, slen, "clear_samples")) {
        int32_t c;
        if (parse_count(key, klen, v, vlen, 0, &c)) return 1;
        if (c < 1) return reject_key(key, klen, "must be at least 1");
        cfg.gps_clear_samples = c;
        return 0;
    }
    if (starts_with(sub, slen, "severity.")) {
        int r = severity_rule(sub + 9, slen - 9, 0, 1);
        if (r < 0) return reject_key(key, klen, "unknown rule (fix_lost, jump)");
        return parse_severity(key, klen, v, vlen, &cfg.gps_severity[r - N_SIG_RULES]);
    }
    ap_text t = {errbuf, sizeof errbuf, 0};
    ap_text_str(&t, "unknown param ");
    put_span(&t, key, klen);
    ap_text_str(&t, " (gps keys: fix, lat, lon, name, fix_lost_samples, max_speed_mps, clear_samples, "
                    "severity.<fix_lost|jump>)");
    return reject(errbuf);
}

static int param_line(const char *key, int klen, const char *v, int vlen) {
    if (starts_with(key, klen, "host.")) return 0;          /* set by the appliance (host.dsp) */
    if (str_eq(key, klen, "clear_samples")) {
        int32_t c;
        if (parse_count(key, klen, v, vlen, 0, &c)) return 1;
        if (c < 1) return reject_key(key, klen, "must be at least 1");
        cfg.clear_samples = c;
        return 0;
    }
    if (str_eq(key, klen, "decimals")) {
        int32_t d;
        if (parse_count(key, klen, v, vlen, 0, &d)) return 1;
        if (d > 9) return reject_key(key, klen, "at most 9");
        cfg.decimals = d;
        return 0;
    }
    if (starts_with(key, klen, "severity.")) {
        int r = severity_rule(key + 9, klen - 9, 1, 1);
        if (r < 0) return reject_key(key, klen, "unknown rule (range, rate, stuck, drift, missing, fix_lost, jump)");
        return parse_severity(key, klen, v, vlen, &cfg.severity[r]);
    }
    if (starts_with(key, klen, "gps.")) return gps_key(key, klen, key + 4, klen - 4, v, vlen);
    if (starts_with(key, klen, "signal.")) {
        int i = 7, idx = 0, digits = 0;
        while (i < klen && key[i] >= '0' && key[i] <= '9') {
            if (idx < 100000) idx = idx * 10 + (key[i] - '0');
            i++;
            digits++;
        }
        if (!digits || i >= klen || key[i] != '.')
            return reject_key(key, klen, "expected signal.<channel index>.<key>, e.g. signal.0.max");
        if (idx >= MAX_SIGNALS) return reject_key(key, klen, "channel index beyond 31 (at most 32 signals)");
        i++;
        return signal_key(idx, key, klen, key + i, klen - i, v, vlen);
    }
    ap_text t = {errbuf, sizeof errbuf, 0};
    ap_text_str(&t, "unknown param ");
    put_span(&t, key, klen);
    ap_text_str(&t, " (known: signal.<N>.*, gps.*, clear_samples, decimals, severity.<rule>)");
    return reject(errbuf);
}

/* "signal.N (name): problem" */
static int reject_signal(int idx, const char *problem) {
    ap_text t = {errbuf, sizeof errbuf, 0};
    ap_text_str(&t, "signal.");
    ap_text_int(&t, idx);
    ap_text_str(&t, " (");
    ap_text_str(&t, cfg.sig[idx].name);
    ap_text_str(&t, "): ");
    ap_text_str(&t, problem);
    return reject(errbuf);
}

static void add_watch(int32_t ch) {
    for (int i = 0; i < cfg.nwatch; i++)
        if (cfg.watch[i] == ch) return;
    cfg.watch[cfg.nwatch++] = ch;
    if (ch > cfg.max_channel) cfg.max_channel = ch;
}

static int validate(void) {
    int rules = 0;
    for (int i = 0; i < MAX_SIGNALS; i++) {
        sig_cfg *s = &cfg.sig[i];
        if (!s->used) continue;
        if (!s->name[0]) {
            ap_text t = {s->name, sizeof s->name, 0};
            ap_text_str(&t, "ch");
            ap_text_int(&t, i);
        }
        if (s->has_min && s->has_max && !(s->min < s->max)) {
            ap_text t = {errbuf, sizeof errbuf, 0};
            ap_text_str(&t, "signal.");
            ap_text_int(&t, i);
            ap_text_str(&t, " (");
            ap_text_str(&t, s->name);
            ap_text_str(&t, "): min ");
            put_num(&t, s->min, 6);
            ap_text_str(&t, " must be less than max ");
            put_num(&t, s->max, 6);
            return reject(errbuf);
        }
        if (s->has_tol && !s->stuck_samples) return reject_signal(i, "stuck_tolerance needs stuck_samples");
        int drift_keys = s->has_target || s->learn || s->has_k || s->has_h || s->has_lambda || s->has_limit ||
                         s->has_dir;
        if (drift_keys) {
            if (s->has_lambda || s->has_limit) {
                if (!(s->has_lambda && s->has_limit))
                    return reject_signal(i, "an EWMA drift rule needs both drift.ewma (0..1] and drift.limit");
                if (s->has_k || s->has_h)
                    return reject_signal(i, "drift: give drift.k/drift.h (CUSUM) or drift.ewma/drift.limit "
                                            "(EWMA), not both");
                s->drift = DRIFT_EWMA;
            } else {
                if (!s->has_h) return reject_signal(i, "a CUSUM drift rule needs drift.h (and optionally drift.k)");
                s->drift = DRIFT_CUSUM;
            }
            if (s->has_target == (s->learn > 0))
                return reject_signal(i, "drift needs exactly one of drift.target and drift.learn");
            if (!s->has_dir) s->drift_dir = DIR_BOTH;
        }
        int n = (s->has_min || s->has_max) + (s->rate_max > 0) + (s->stuck_samples > 0) + (s->drift != DRIFT_OFF) +
                (s->missing_max >= 0);
        if (!n) return reject_signal(i, "no rule (min, max, rate_max, stuck_samples, drift.*, missing_max)");
        for (int j = 0; j < i; j++)
            if (cfg.sig[j].used && str_eq(s->name, ap_strlen(s->name), cfg.sig[j].name))
                return reject_signal(i, "the same name as another signal");
        if (!s->clear_samples) s->clear_samples = cfg.clear_samples;
        if (s->decimals < 0) s->decimals = cfg.decimals;
        for (int r = 0; r < N_SIG_RULES; r++)
            if (s->severity[r] < 0) s->severity[r] = cfg.severity[r];
        rules += n;
        cfg.nsig++;
        add_watch(i);
    }
    if (cfg.gps_used) {
        if ((cfg.lat_ch >= 0) != (cfg.lon_ch >= 0)) return reject("gps: give both gps.lat and gps.lon");
        if (cfg.fix_lost_samples && cfg.fix_ch < 0) return reject("gps.fix_lost_samples needs gps.fix (the fix quality channel)");
        if (cfg.max_speed > 0 && cfg.lat_ch < 0) return reject("gps.max_speed_mps needs gps.lat and gps.lon");
        if (!cfg.fix_lost_samples && !(cfg.max_speed > 0))
            return reject("gps: no rule (gps.fix_lost_samples, gps.max_speed_mps)");
        if (cfg.lat_ch >= 0 && cfg.lat_ch == cfg.lon_ch) return reject("gps.lat and gps.lon are the same channel");
        if (!cfg.gps_name[0]) {
            ap_text t = {cfg.gps_name, sizeof cfg.gps_name, 0};
            ap_text_str(&t, "gps");
        }
        for (int j = 0; j < MAX_SIGNALS; j++)
            if (cfg.sig[j].used && str_eq(cfg.gps_name, ap_strlen(cfg.gps_name), cfg.sig[j].name))
                return reject("gps.name is the same as a signal's name");
        if (!cfg.gps_clear_samples) cfg.gps_clear_samples = cfg.clear_samples;
        for (int r = 0; r < N_GPS_RULES; r++)
            if (cfg.gps_severity[r] < 0) cfg.gps_severity[r] = cfg.severity[N_SIG_RULES + r];
        if (cfg.fix_ch >= 0) add_watch(cfg.fix_ch);
        if (cfg.lat_ch >= 0) { add_watch(cfg.lat_ch); add_watch(cfg.lon_ch); }
        rules += (cfg.fix_lost_samples > 0) + (cfg.max_speed > 0);
    }
    if (!rules) return reject("no rules: configure signal.<N>.* (e.g. signal.0.max) or gps.*");
    return 0;
}

int32_t ap_init(const char *params, int32_t len) {
    __builtin_memset(&cfg, 0, sizeof cfg);
    __builtin_memset(ss, 0, sizeof ss);
    __builtin_memset(&gs, 0, sizeof gs);
    __builtin_memset(&pw, 0, sizeof pw);
    warned_channels = warned_frames = 0;
    cfg.clear_samples = 5;
    cfg.decimals = 2;
    for (int r = 0; r < N_SIG_RULES + N_GPS_RULES; r++) cfg.severity[r] = AP_SEV_WARNING;
    cfg.severity[R_RANGE] = AP_SEV_ALARM;
    cfg.fix_ch = cfg.lat_ch = cfg.lon_ch = -1;
    cfg.max_channel = -1;
    for (int r = 0; r < N_GPS_RULES; r++) cfg.gps_severity[r] = -1;
    for (int i = 0; i < MAX_SIGNALS; i++) {
        cfg.sig[i].missing_max = -1;
        cfg.sig[i].decimals = -1;
        for (int r = 0; r < N_SIG_RULES; r++) cfg.sig[i].severity[r] = -1;
    }
    ap_params_iter it = ap_params_begin(params, len);
    const char *key, *value;
    int32_t klen, vlen;
    while (ap_params_next(&it, &key, &klen, &value, &vlen)) {
        if (!value || klen == 0) return reject_key(key, klen + (value ? vlen + 1 : 0), "not a key=value line");
        if (param_line(key, klen, value, vlen)) return 1;
    }
    return validate();
}

/* ---- events ----------------------------------------------------------------------------------- */

static void feature(const char *prefix, const char *rule, const char *what, int idx, double value) {
    if (win.features >= MAX_FEATURES) return;
    char name[72];
    ap_text t = {name, sizeof name, 0};
    ap_text_str(&t, prefix);
    ap_text_str(&t, ".");
    ap_text_str(&t, rule);
    ap_text_str(&t, ".");
    ap_text_str(&t, what);
    if (idx >= 0) {
        ap_text_str(&t, ".");
        ap_text_int(&t, idx);
    }
    ap_feature(name, value);
    win.features++;
}

/* Oldest first; n of them. */
static int hist_get(const float *ring, int32_t n, int32_t pos, float *out) {
    int32_t start = n < HIST ? 0 : pos;
    for (int32_t i = 0; i < n; i++) out[i] = ring[(start + i) % HIST];
    return n;
}

static void hist_push(float *ring, int32_t *n, int32_t *pos, float v) {
    ring[*pos] = v;
    *pos = (*pos + 1) % HIST;
    if (*n < HIST) (*n)++;
}

static void put_history(ap_text *t, const char *label, const float *h, int n, int dec) {
    ap_text_str(t, " (last ");
    ap_text_int(t, n);
    ap_text_str(t, label);
    ap_text_str(t, ":");
    for (int i = 0; i < n; i++) {
        ap_text_str(t, " ");
        put_num(t, h[i], dec);
    }
    ap_text_str(t, ")");
}

/* A transition the window has no event left for (ABI: 16 per window) waits: the rule's state
 * stays as it was and the next sample tries again. Counted once per rule and window. */
static void defer(rule_state *rs) {
    if (rs->deferred_in != win.count) {
        rs->deferred_in = win.count;
        win.deferred++;
    }
}

/* Hysteresis per (signal, rule): 1 = raise now, 2 = clear now, 0 = nothing. */
static int judge(rule_state *rs, int verdict, int clear_samples) {
    if (verdict == V_FAIL) {
        rs->passes = 0;
        if (rs->active) return 0;
        if (win.events >= MAX_EVENTS) { defer(rs); return 0; }
        rs->active = 1;
        return 1;
    }
    if (verdict == V_PASS && rs->active) {
        if (rs->passes < clear_samples) rs->passes++;
        if (rs->passes < clear_samples) return 0;
        if (win.events >= MAX_EVENTS) { defer(rs); return 0; }
        rs->active = 0;
        rs->passes = 0;
        return 2;
    }
    return 0;
}

typedef struct {
    double value, observed, limit, score;
} evidence;

static void emit(int severity, double score, const char *msg) {
    ap_event(severity, score, msg);
    win.events++;
}

static void signal_event(int idx, int rule, int kind, double x, const evidence *e, const char *detail) {
    const sig_cfg *c = &cfg.sig[idx];
    const sig_state *s = &ss[idx];
    float h[HIST];
    int n = hist_get(s->hist, s->hist_n, s->hist_pos, h);
    char msg[512];
    ap_text t = {msg, sizeof msg, 0};
    ap_text_str(&t, c->name);
    if (kind == 1) {
        ap_text_str(&t, " ");
        ap_text_str(&t, sig_rule_text[rule]);
        ap_text_str(&t, detail[0] == ' ' ? "" : ": ");   /* drift: " up: ..." */
        ap_text_str(&t, detail);
    } else {
        ap_text_str(&t, " back to normal (");
        ap_text_str(&t, sig_rule_text[rule]);
        ap_text_str(&t, " cleared after ");
        ap_text_int(&t, c->clear_samples);
        ap_text_str(&t, " samples): value ");
        put_num(&t, x, c->decimals);
        if (detail[0]) {
            ap_text_str(&t, ", ");
            ap_text_str(&t, detail);
        }
    }
    put_history(&t, "", h, n, c->decimals);
    const char *rk = sig_rule_key[rule];
    feature(c->name, rk, "value", -1, x);
    feature(c->name, rk, "observed", -1, e->observed);
    feature(c->name, rk, "limit", -1, e->limit);
    for (int i = 0; i < n; i++) feature(c->name, rk, "history", i, h[i]);
    emit(kind == 1 ? c->severity[rule] : AP_SEV_INFO, e->score, msg);
}

/* ---- per-sample rules --------------------------------------------------------------------------- */

static void reset_signal_run(sig_state *s) {
    s->has_prev = 0;
    s->prev_steps = 1;
    s->run = 0;
    s->run_from_change = 0;
    s->nan_run = 0;
}

static void eval_signal(int idx, float xf) {
    const sig_cfg *c = &cfg.sig[idx];
    sig_state *s = &ss[idx];
    double x = xf;
    char d[256];
    ap_text t;
    evidence e;
    hist_push(s->hist, &s->hist_n, &s->hist_pos, xf);

    if (!ap_isfinite(x)) {                       /* NaN: a failed read; skipped, but counted */
        s->nan_run++;
        if (s->has_prev) s->prev_steps++;
        if (c->missing_max >= 0) {
            int v = s->nan_run > c->missing_max ? V_FAIL : V_NONE;
            if (judge(&s->rs[R_MISSING], v, c->clear_samples) == 1) {
                t = (ap_text){d, sizeof d, 0};
                ap_text_int(&t, s->nan_run);
                ap_text_str(&t, " samples in a row without a value > missing_max ");
                ap_text_int(&t, c->missing_max);
                e = (evidence){x, s->nan_run, c->missing_max, (double)s->nan_run / (c->missing_max + 1)};
                signal_event(idx, R_MISSING, 1, x, &e, d);
            }
        }
        return;
    }

    if (c->missing_max >= 0) {
        int32_t missed = s->nan_run;
        if (judge(&s->rs[R_MISSING], V_PASS, c->clear_samples) == 2) {
            t = (ap_text){d, sizeof d, 0};
            ap_text_str(&t, "data again");
            e = (evidence){x, missed, c->missing_max, 0};
            signal_event(idx, R_MISSING, 2, x, &e, d);
        }
    }
    s->nan_run = 0;

    if (c->has_min || c->has_max) {
        int high = c->has_max && x > c->max, low = c->has_min && x < c->min;
        double width = c->has_min && c->has_max ? c->max - c->min : 0;
        double lim = high ? c->max : low ? c->min : (c->has_max ? c->max : c->min);
        double excess = high ? x - c->max : low ? c->min - x : 0;
        if (width <= 0) width = ap_fabs(lim) > 1 ? ap_fabs(lim) : 1;
        int k = judge(&s->rs[R_RANGE], high || low ? V_FAIL : V_PASS, c->clear_samples);
        if (k) {
            t = (ap_text){d, sizeof d, 0};
            if (k == 1) {
                put_num(&t, x, c->decimals);
                ap_text_str(&t, high ? " > max " : " < min ");
                put_num(&t, lim, c->decimals);
            } else {
                ap_text_str(&t, "within ");
                if (c->has_min && c->has_max) {
                    ap_text_str(&t, "[");
                    put_num(&t, c->min, c->decimals);
                    ap_text_str(&t, ", ");
                    put_num(&t, c->max, c->decimals);
                    ap_text_str(&t, "]");
                } else {
                    ap_text_str(&t, c->has_max ? "max " : "min ");
                    put_num(&t, lim, c->decimals);
                }
            }
            e = (evidence){x, x, lim, k == 1 ? 1 + excess / width : 0};
            signal_event(idx, R_RANGE, k, x, &e, d);
        }
    }

    if (c->rate_max > 0) {
        int v = V_NONE;
        double rate = 0, dt = 0;
        if (s->has_prev) {
            dt = s->prev_steps / win.rate;
            rate = ap_fabs(x - s->prev) * win.rate / s->prev_steps;
            v = rate > c->rate_max ? V_FAIL : V_PASS;
        }
        int k = judge(&s->rs[R_RATE], v, c->clear_samples);
        if (k) {
            t = (ap_text){d, sizeof d, 0};
            if (k == 1) {
                put_num(&t, rate, c->decimals);
                ap_text_str(&t, "/s > rate_max ");
                put_num(&t, c->rate_max, c->decimals);
                ap_text_str(&t, "/s (");
                put_num(&t, s->prev, c->decimals);
                ap_text_str(&t, " to ");
                put_num(&t, x, c->decimals);
                ap_text_str(&t, " in ");
                put_num(&t, dt, 3);
                ap_text_str(&t, " s)");
            } else {
                ap_text_str(&t, "rate ");
                put_num(&t, rate, c->decimals);
                ap_text_str(&t, "/s");
            }
            e = (evidence){x, rate, c->rate_max, rate / c->rate_max};
            signal_event(idx, R_RATE, k, x, &e, d);
        }
        s->has_prev = 1;
        s->prev = x;
        s->prev_steps = 1;
    }

    if (c->stuck_samples) {
        double lo = x < s->run_lo ? x : s->run_lo, hi = x > s->run_hi ? x : s->run_hi;
        if (s->run > 0 && hi - lo <= c->stuck_tol) {
            s->run++;
            s->run_lo = lo;
            s->run_hi = hi;
        } else {
            s->run_from_change = s->run > 0;
            s->run = 1;
            s->run_lo = s->run_hi = x;
        }
        int v = s->run >= c->stuck_samples ? V_FAIL : s->run_from_change ? V_PASS : V_NONE;
        int k = judge(&s->rs[R_STUCK], v, c->clear_samples);
        if (k) {
            t = (ap_text){d, sizeof d, 0};
            if (k == 1) {
                ap_text_int(&t, s->run);
                ap_text_str(&t, " samples within ");
                put_num(&t, c->stuck_tol, c->decimals);
                ap_text_str(&t, " of ");
                put_num(&t, x, c->decimals);
                ap_text_str(&t, " >= stuck_samples ");
                ap_text_int(&t, c->stuck_samples);
            } else {
                ap_text_str(&t, "changing again");
            }
            e = (evidence){x, s->run, c->stuck_samples, (double)s->run / c->stuck_samples};
            signal_event(idx, R_STUCK, k, x, &e, d);
        }
    }

    if (c->drift != DRIFT_OFF) {
        int v = V_NONE;
        double stat = 0, lim = c->drift == DRIFT_CUSUM ? c->h : c->limit;
        int up = 1, learning = 0;
        if (!s->target_ok) {
            learning = c->learn > 0;             /* a sample that teaches the target is not judged */
            if (c->learn) {
                s->learn_sum += x;
                s->learned++;
                if (s->learned >= c->learn) {
                    s->target = s->learn_sum / s->learned;
                    s->target_ok = 1;
                    s->ewma = s->target;
                    t = (ap_text){d, sizeof d, 0};
                    ap_text_str(&t, c->name);
                    ap_text_str(&t, ": drift target learned: ");
                    put_num(&t, s->target, c->decimals + 2);
                    ap_text_str(&t, " from ");
                    ap_text_int(&t, s->learned);
                    ap_text_str(&t, " samples");
                    ap_log(AP_LOG_INFO, d);
                }
            } else {
                s->target = c->target;
                s->target_ok = 1;
                s->ewma = s->target;
            }
        }
        if (s->target_ok && !learning) {
            if (c->drift == DRIFT_CUSUM) {
                double sp = s->sp + (x - s->target - c->k), sn = s->sn + (s->target - x - c->k);
                s->sp = sp > 0 ? sp : 0;
                s->sn = sn > 0 ? sn : 0;
                double a = c->drift_dir & DIR_UP ? s->sp : 0, b = c->drift_dir & DIR_DOWN ? s->sn : 0;
                stat = a >= b ? a : b;
                up = a >= b;
            } else {
                s->ewma = c->lambda * x + (1 - c->lambda) * s->ewma;
                double dev = s->ewma - s->target;
                double a = c->drift_dir & DIR_UP ? dev : 0, b = c->drift_dir & DIR_DOWN ? -dev : 0;
                stat = a >= b ? a : b;
                up = a >= b;
            }
            v = stat > lim ? V_FAIL : V_PASS;
        }
        int k = judge(&s->rs[R_DRIFT], v, c->clear_samples);
        if (k) {
            t = (ap_text){d, sizeof d, 0};
            if (k == 1) {
                ap_text_str(&t, up ? " up: " : " down: ");
                ap_text_str(&t, c->drift == DRIFT_CUSUM ? "CUSUM " : "EWMA deviation ");
                put_num(&t, stat, c->decimals);
                ap_text_str(&t, c->drift == DRIFT_CUSUM ? " > h " : " > limit ");
                put_num(&t, lim, c->decimals);
                ap_text_str(&t, " (target ");
                put_num(&t, s->target, c->decimals);
                if (c->drift == DRIFT_CUSUM) {
                    ap_text_str(&t, ", k ");
                    put_num(&t, c->k, c->decimals);
                } else {
                    ap_text_str(&t, ", EWMA ");
                    put_num(&t, s->ewma, c->decimals);
                }
                ap_text_str(&t, ", value ");
                put_num(&t, x, c->decimals);
                ap_text_str(&t, ")");
            } else {
                ap_text_str(&t, c->drift == DRIFT_CUSUM ? "CUSUM " : "EWMA deviation ");
                put_num(&t, stat, c->decimals);
            }
            e = (evidence){x, stat, lim, stat / lim};
            signal_event(idx, R_DRIFT, k, x, &e, d);
        }
    }
}

static void gps_event(int rule, int kind, const evidence *e, const char *detail, const float *h, int n,
                      const char *label, int dec, const double *pos) {
    char msg[512];
    ap_text t = {msg, sizeof msg, 0};
    ap_text_str(&t, cfg.gps_name);
    if (kind == 1) {
        ap_text_str(&t, " ");
        ap_text_str(&t, gps_rule_text[rule]);
        ap_text_str(&t, ": ");
    } else {
        ap_text_str(&t, " back to normal (");
        ap_text_str(&t, gps_rule_text[rule]);
        ap_text_str(&t, " cleared after ");
        ap_text_int(&t, cfg.gps_clear_samples);
        ap_text_str(&t, " samples): ");
    }
    ap_text_str(&t, detail);
    put_history(&t, label, h, n, dec);
    const char *rk = gps_rule_key[rule];
    feature(cfg.gps_name, rk, "value", -1, e->value);
    feature(cfg.gps_name, rk, "observed", -1, e->observed);
    feature(cfg.gps_name, rk, "limit", -1, e->limit);
    for (int i = 0; i < n; i++) feature(cfg.gps_name, rk, "history", i, h[i]);
    if (pos) {
        feature(cfg.gps_name, rk, "prev_lat", -1, pos[0]);
        feature(cfg.gps_name, rk, "prev_lon", -1, pos[1]);
        feature(cfg.gps_name, rk, "lat", -1, pos[2]);
        feature(cfg.gps_name, rk, "lon", -1, pos[3]);
        feature(cfg.gps_name, rk, "dt", -1, pos[4]);
    }
    emit(kind == 1 ? cfg.gps_severity[rule] : AP_SEV_INFO, e->score, msg);
}

static void reset_gps_run(void) {
    gs.nofix_run = 0;
    gs.has_fix = 0;
    gs.steps = 0;
}

static void eval_gps(const ap_window_header *h, uint32_t i) {
    char d[320];
    ap_text t;
    evidence e;
    float hh[HIST];
    int fix = 1;
    double q = 1;
    if (cfg.fix_ch >= 0) {
        q = ap_window_channel(h, (uint32_t)cfg.fix_ch)[i];
        fix = q >= 0.5;                          /* NaN (not reported) counts as no fix */
        hist_push(gs.qhist, &gs.qhist_n, &gs.qhist_pos, (float)q);
    }
    if (cfg.fix_lost_samples) {
        gs.nofix_run = fix ? 0 : gs.nofix_run + 1;
        int v = fix ? V_PASS : gs.nofix_run >= cfg.fix_lost_samples ? V_FAIL : V_NONE;
        int k = judge(&gs.rs[G_FIX], v, cfg.gps_clear_samples);
        if (k) {
            t = (ap_text){d, sizeof d, 0};
            if (k == 1) {
                ap_text_str(&t, "no fix (fix quality ");
                put_num(&t, q, 0);
                ap_text_str(&t, ") for ");
                ap_text_int(&t, gs.nofix_run);
                ap_text_str(&t, " samples >= fix_lost_samples ");
                ap_text_int(&t, cfg.fix_lost_samples);
            } else {
                ap_text_str(&t, "fix quality ");
                put_num(&t, q, 0);
            }
            e = (evidence){q, gs.nofix_run, cfg.fix_lost_samples,
                           (double)gs.nofix_run / cfg.fix_lost_samples};
            int n = hist_get(gs.qhist, gs.qhist_n, gs.qhist_pos, hh);
            gps_event(G_FIX, k, &e, d, hh, n, " fix qualities", 0, 0);
        }
    }
    if (cfg.lat_ch < 0) return;
    double lat = ap_window_channel(h, (uint32_t)cfg.lat_ch)[i];
    double lon = ap_window_channel(h, (uint32_t)cfg.lon_ch)[i];
    int valid = fix && ap_isfinite(lat) && ap_isfinite(lon) && lat >= -90 && lat <= 90 && lon >= -180 &&
                lon <= 180;
    if (gs.has_fix) gs.steps++;
    if (!valid) return;
    if (gs.has_fix && cfg.max_speed > 0) {
        double dt = gs.steps / win.rate;
        double dist = distance_m(gs.lat, gs.lon, lat, lon);
        double speed = dist / dt;
        hist_push(gs.vhist, &gs.vhist_n, &gs.vhist_pos, (float)speed);
        int k = judge(&gs.rs[G_JUMP], speed > cfg.max_speed ? V_FAIL : V_PASS, cfg.gps_clear_samples);
        if (k) {
            t = (ap_text){d, sizeof d, 0};
            if (k == 1) {
                put_num(&t, dist, 1);
                ap_text_str(&t, " m in ");
                put_num(&t, dt, 3);
                ap_text_str(&t, " s = ");
                put_num(&t, speed, 1);
                ap_text_str(&t, " m/s > max_speed_mps ");
                put_num(&t, cfg.max_speed, 1);
                ap_text_str(&t, " (from ");
            } else {
                ap_text_str(&t, "speed ");
                put_num(&t, speed, 1);
                ap_text_str(&t, " m/s (from ");
            }
            put_num(&t, gs.lat, 6);
            ap_text_str(&t, ",");
            put_num(&t, gs.lon, 6);
            ap_text_str(&t, " to ");
            put_num(&t, lat, 6);
            ap_text_str(&t, ",");
            put_num(&t, lon, 6);
            ap_text_str(&t, ")");
            e = (evidence){dist, speed, cfg.max_speed, speed / cfg.max_speed};
            double pos[5] = {gs.lat, gs.lon, lat, lon, dt};
            int n = hist_get(gs.vhist, gs.vhist_n, gs.vhist_pos, hh);
            gps_event(G_JUMP, k, &e, d, hh, n, " speeds m/s", 1, pos);
        }
    }
    gs.has_fix = 1;
    gs.lat = lat;
    gs.lon = lon;
    gs.steps = 0;
}

/* ---- windows ---------------------------------------------------------------------------------- */

/* Do the first frames-hop samples of this window repeat the last ones of the previous window,
 * bit for bit, on every watched channel? 0: no; 1: yes, but the repeated part is constant (a
 * flat signal matches any shift, so it proves nothing); 2: yes, and the part varies. */
static int overlaps(const ap_window_header *h, uint32_t hop) {
    uint32_t n = h->frames;
    if (hop == 0 || hop >= n) return 0;
    int varies = 0;
    for (int w = 0; w < cfg.nwatch; w++) {
        const float *cur = ap_window_channel(h, (uint32_t)cfg.watch[w]);
        const float *old = prev_win[cfg.watch[w]];
        uint32_t first = f32_bits(cur[0]);
        for (uint32_t j = 0; j + hop < n; j++) {
            uint32_t b = f32_bits(cur[j]);
            if (b != f32_bits(old[j + hop])) return 0;
            if (b != first) varies = 1;
        }
    }
    return varies ? 2 : 1;
}

/* How many samples at the end of this window are new; *gap = 1 when they do not continue the
 * samples seen before (first window, dropped windows, a jump of the clock, a restarted stream).
 * docs/modules/process.md, "Windows", explains the order of the tests. */
static uint32_t new_samples(const ap_window_header *h, int *gap) {
    uint32_t n = h->frames;
    *gap = 1;
    if (!pw.have || h->sequence != pw.seq + 1 || h->dropped || n != pw.frames || h->sample_rate != pw.rate)
        return n;
    /* The sample clock: windows start a whole number of samples apart. NMEA fixes are stamped on
     * arrival, so a replay faster than the nominal rate gives a clock that says nothing. */
    double steps = (double)(h->start_time_ns - pw.start_ns) * h->sample_rate / 1e9;
    if (steps > n + 0.5) return n;            /* samples skipped: hop > size, or a source gap */
    uint32_t hc = 0;
    if (steps >= 0.75) {
        double r = (double)(int64_t)(steps + 0.5);
        if (ap_fabs(steps - r) <= 0.25) hc = (uint32_t)r;
    }
    *gap = 0;
    if (hc >= n) return n;                    /* back-to-back windows (hop == size) */
    if (hc && overlaps(h, hc)) { pw.known_hop = hc; return hc; }
    /* No usable clock (or it disagrees with the samples): the samples decide. */
    uint32_t first = 0;
    for (uint32_t k = 1; k < n && !first; k++) {
        int o = overlaps(h, k);
        if (o == 2) { pw.known_hop = k; return k; }
        if (o == 1) first = k;
    }
    if (first) {
        /* A flat stretch matches any shift: keep the hop seen before; without one, the
         * smallest shift (it may leave samples out, it never counts one twice). */
        if (pw.known_hop == n) return n;
        if (pw.known_hop && overlaps(h, pw.known_hop)) return pw.known_hop;
        return first;
    }
    if (hc) { *gap = 1; return n; }           /* the clock says overlap, the samples say otherwise */
    pw.known_hop = n;                         /* no overlap at all: back-to-back windows */
    return n;
}

int32_t ap_process(const uint8_t *window, int32_t len) {
    const ap_window_header *h = ap_window_open(window, len);
    if (!h) { ap_log(AP_LOG_ERROR, "not a float32 sample window"); return -1; }
    if (!(h->sample_rate > 0) || !ap_isfinite(h->sample_rate)) {
        ap_log(AP_LOG_ERROR, "window has no valid sample rate");
        return -2;
    }
    if ((int64_t)h->channels <= cfg.max_channel) {
        if (!warned_channels) {
            char m[160];
            ap_text t = {m, sizeof m, 0};
            ap_text_str(&t, "window has ");
            ap_text_int(&t, h->channels);
            ap_text_str(&t, " channels, the params use channel ");
            ap_text_int(&t, cfg.max_channel);
            ap_text_str(&t, " (indices count from 0); windows refused");
            ap_log(AP_LOG_ERROR, m);
            warned_channels = 1;
        }
        return -3;
    }
    if (h->frames > MAX_FRAMES) {
        if (!warned_frames) {
            ap_log(AP_LOG_ERROR, "window longer than 4096 frames; windows refused");
            warned_frames = 1;
        }
        return -4;
    }
    win.events = win.features = win.deferred = 0;
    win.count++;
    win.rate = h->sample_rate;

    int gap;
    uint32_t fresh = new_samples(h, &gap);
    if (gap) {
        for (int i = 0; i < MAX_SIGNALS; i++) reset_signal_run(&ss[i]);
        reset_gps_run();
        if (pw.have) {
            char m[120];
            ap_text t = {m, sizeof m, 0};
            ap_text_str(&t, "window ");
            ap_text_int(&t, (int64_t)h->sequence);
            ap_text_str(&t, " does not continue the previous one: rule runs restart");
            ap_log(AP_LOG_DEBUG, m);
        }
    }
    for (int w = 0; w < cfg.nwatch; w++) {
        const float *src = ap_window_channel(h, (uint32_t)cfg.watch[w]);
        float *dst = prev_win[cfg.watch[w]];
        for (uint32_t j = 0; j < h->frames; j++) dst[j] = src[j];
    }
    pw.have = 1;
    pw.seq = h->sequence;
    pw.start_ns = h->start_time_ns;
    pw.frames = h->frames;
    pw.rate = h->sample_rate;

    for (uint32_t i = h->frames - fresh; i < h->frames; i++) {
        for (int c = 0; c < MAX_SIGNALS; c++)
            if (cfg.sig[c].used) eval_signal(c, ap_window_channel(h, (uint32_t)c)[i]);
        if (cfg.gps_used) eval_gps(h, i);
    }

    int active = 0;
    for (int c = 0; c < MAX_SIGNALS; c++)
        for (int r = 0; r < N_SIG_RULES; r++) active += ss[c].rs[r].active;
    for (int r = 0; r < N_GPS_RULES; r++) active += gs.rs[r].active;
    ap_feature("new_samples", fresh);
    ap_feature("gap", gap);
    ap_feature("active_rules", active);
    if (win.deferred) {
        char m[120];
        ap_text t = {m, sizeof m, 0};
        ap_text_str(&t, "16 events in one window: ");
        ap_text_int(&t, win.deferred);
        ap_text_str(&t, " rule transitions wait for the next samples");
        ap_log(AP_LOG_WARNING, m);
    }
    return 0;
}
