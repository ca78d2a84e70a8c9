/* bearing: the per-window analysis - time-domain statistics, velocity and band energies, the
 * envelope spectrum at the fault frequencies, the shaft speed estimate and its track. Part of
 * bearing.c (one translation unit: included once, after its config and work buffers, so that
 * the SDK's static state - ap_dsp.h's host switch and work buffers - exists once). */

/* ---- analysis ------------------------------------------------------------------------------- */

typedef struct {
    double mean, rms, peak, crest, kurtosis, skewness, velocity, bands[8];
    double env_amp[N_KINDS], env_ratio[N_KINDS], env_floor;
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
        r->mean = m[AP_MOM_MEAN];
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

/* Fault-frequency amplitudes (amp: this channel's A_k) and their ratios to the median floor. */
static void envelope_faults(const float *amp, double floor, int32_t n, double bw, const fault_freqs *ff,
                            channel_result *r) {
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
            if (h == 1) r->env_amp[kd] = a;
        }
        r->env_ratio[kd] = ratio_sum / HARMONICS;
    }
}

