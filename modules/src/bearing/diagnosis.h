/* bearing: the diagnosis - each part's signature in the envelope spectrum, its confidence, the
 * kurtogram's band and the ring of the event's spectra. Part of bearing.c (one
 * translation unit, included once after features.h). reference.py is the same in numpy. */

/* ---- diagnosis: the part's signature in the envelope spectrum -------------------------------- */

/* Once a window is anomalous, and for as long as its event story lasts, each diagnosed window's
 * diagnostic envelope spectrum (diagnosis.band: the envelope band, or the kurtogram's;
 * diagnosis.prewhiten: cepstrum pre-whitening; diagnosis.envelope: magnitude or squared) goes
 * into a ring of the last diagnosis.windows spectra, windows at least a window apart (overlapping
 * ones are not independent: in between, the last verdict stands), and each part's signature is
 * scored on the ring's mean (noise averages out, lines stay):
 *
 *   outer race  BPFO and its harmonics up to 5 BPFI, x (1 - shaft-rate AM): a -/+ fr pair's
 *               presence x its depth (a_lo + a_hi) / a_carrier (amplitudes over the floor, at most
 *               1) takes that share off (a stationary defect is not modulated by the shaft's turn)
 *   inner race  BPFI and its harmonics up to 5 BPFI (its shared ones only for their sidebands),
 *               x the presence of a +-fr / +-2 fr sideband (the defect turns with the shaft
 *               through the load zone; often one-sided)
 *   ball        2 x BSF h = 1..3, x the presence of a -FTF / +FTF pair at one harmonic (both: the
 *               sidebands sit a few bins off the carrier, where a skirt or a stray line is)
 *   cage        FTF h = 1..3, x 1, weak evidence on its own: its confidence halved
 *
 * A carrier is the largest power within bw/2 + tol x f of its frequency f (tol 1 % for the races,
 * 2 % for ball and cage, whose elements slip), shaft harmonics aside (the machine's lines), over
 * the median of the mean from bin 2 to 5 x BPFI (the floor): its ratio r2. A carrier two parts
 * both predict (3 x BPFO and 2 x BPFI lie 0.7 % apart) is evidence for neither and is left out,
 * of the part's lines and of the total. A sideband is looked for at the measured carrier +- the
 * modulation, within min(bw + tol x m, spacing/2 - bw) (spacing: the comb's, fr or FTF), not on
 * another part's carrier, shaft harmonics aside, and counts only as a local maximum of the
 * spectrum (a skirt falls away from the carrier: not a line) that stands above its local
 * continuum (a bump on the skirt must clear the skirt); its share of power and depth are over the
 * floor, like the carrier's. Presence of a group of lines: one minus the chance that noise alone
 * puts its strongest line that high in that many bins (every window tried), from the noise law
 * of the mean of K windows (power ~ Gamma(K, mean/K); K = diagnosis.dof). The signature
 * probability of a part (diagnosis.signature_p) is the presence of its carriers x its rule; its
 * confidence that x the share of the spectrum's unambiguous power above the floor that its lines
 * carry. A part is named when its signature is more likely there than not (SIGNATURE_LIKELY), its
 * confidence is at least diagnosis.min_confidence and beats the runner-up by diagnosis.margin. */

#define DIAG_TOL_RACE 0.01
#define DIAG_TOL_ELEMENT 0.02
#define DIAG_MAX_HARMONICS 16           /* of a race's line, up to 5 x BPFI (5..7 for common bearings) */
#define DIAG_ELEMENT_HARMONICS 3        /* of the ball's and the cage's: slip widens their windows with h */
#define DIAG_LINES (2 * DIAG_MAX_HARMONICS + 2 * DIAG_ELEMENT_HARMONICS)
#define DIAG_RING_FLOATS (1 << 18)      /* the ring of spectra: at most this many floats (1 MiB) */
#define SIGNATURE_LIKELY 0.5            /* a part is named only if its signature is more likely there than not */
#define KURT_LOW_EDGE 6.0               /* x BPFI: a candidate band starts one BPFI above the top line */
#define KURT_ABOVE_FLOOR 4.0            /* its mean power: 6 dB over the noise floor (judgement, bearing.md) */
#define KURT_SK_SIGMAS 5.0              /* its SK: 5 x the noise std 2/sqrt(bins), else the fixed band */

static uint8_t sb_skip[N_KINDS][DIAG_MAX_HARMONICS + 1][2][2];   /* [kind][h][modulation][upper]: on another part's carrier */
static float ring[DIAG_RING_FLOATS];            /* the last spectra: slot s, channel c at (s*channels + c)*(mtop+1) */
static float davg[AP_MAX_CHANNELS][AMP_ROW];    /* their mean (power per bin) */
static double dsum[AP_MAX_CHANNELS][AMP_ROW];   /* their sum, kept as spectra come and go */
static uint8_t bin_shaft[AMP_ROW], bin_shared[AMP_ROW];
static float kpow[AMP_ROW];                     /* the kurtogram's bin powers */
static struct {
    int32_t count, next, capacity;      /* spectra in the ring, the slot the next one takes, its size */
    int32_t band_age;                   /* windows since the kurtogram chose the bands */
    int32_t band_confirmed;             /* two choices in a row agreed: the band holds for the event */
    double speeds[64], times[64];       /* per slot: the window's speed estimate (Hz), its start (s) */
    int32_t n, mtop;
    uint32_t channels;
    double fs;
    int32_t k0[AP_MAX_CHANNELS], k1[AP_MAX_CHANNELS];   /* the diagnostic band per channel */
    int32_t dof;
    int warned;
} dg;
static fault_freqs dg_ff;                       /* the last diagnosed window's fault frequencies ... */

typedef struct {
    double conf[N_KINDS], peak_hz[N_KINDS], peak_ratio[N_KINDS], signature[N_KINDS];
} diag_channel;
static diag_channel dg_out[AP_MAX_CHANNELS];    /* ... and its confidences */

typedef struct {
    int32_t kind, h;
    double f, hw, tol;
    int excluded;
} diag_line;

static void diag_reset(void) { dg.count = 0; }

/* New params: the ring is sized again at the next window. */
static void diag_forget(void) { dg.count = 0; dg.n = 0; dg.warned = 0; }

/* The probability that noise alone puts a K-window mean of one bin at r2 x the median or more:
 * the Gamma(K, 1/K) tail at r2 m_K, m_K its median (ln 2 for K = 1, 1 - 1/(3K) beyond:
 * Wilson-Hilferty), e^-x sum_{j<K} x^j/j!, x = K r2 m_K. 0 beyond x = K + 40 sqrt(K), where the
 * tail is below e^-40 (Chernoff; e^-205 at K = 64): there, and only there, the sum would
 * overflow and e^-x underflow (inf x 0: NaN). */
static double noise_tail(double r2, int32_t k) {
    double mk = k == 1 ? 0.69314718055994530942 : 1 - 1.0 / (3.0 * k);
    double x = k * r2 * mk;
    if (x > k + 40 * ap_sqrt((double)k)) return 0;
    double term = 1, sum = 0;
    for (int32_t j = 0; j < k; j++) { sum += term; term *= x / (j + 1); }
    return ap_exp(-x) * sum;
}

/* 1 - (bins) x the noise tail, at least 0: the strongest of a group of lines is not noise. */
static double presence(double r2, int32_t bins, int32_t k) {
    if (r2 <= 1 && bins >= 3) return 0;    /* at or under the median the tail is >= ~0.49: 1 - 3 x 0.49 < 0 */
    double p = 1 - bins * noise_tail(r2, k);
    return p > 0 ? p : 0;
}

/* Degrees of freedom of the ring's mean: K^2 / sum_ij rho_ij, rho_ij the squared overlap of
 * windows i and j (rectangular windows: the correlation of their periodograms), floored, >= 1. */
static int32_t diagnosis_dof(double window_s) {
    double s = 0;
    for (int32_t i = 0; i < dg.count; i++)
        for (int32_t j = 0; j < dg.count; j++) {
            double o = 1 - ap_fabs(dg.times[i] - dg.times[j]) / window_s;
            if (o > 0) s += o * o;
        }
    double k = s > 0 ? (double)dg.count * dg.count / s + 1e-9 : 1;
    return k < 1 ? 1 : (int32_t)k;
}

static int predicted_by_other(const diag_line *lines, int32_t n, int32_t kind, double f, double hw) {
    for (int32_t i = 0; i < n; i++)
        if (lines[i].kind != kind && ap_fabs(lines[i].f - f) <= lines[i].hw + hw) return 1;
    return 0;
}

/* Every tested carrier, with the ones another part's carrier shares marked excluded. */
static int32_t diag_lines(const fault_freqs *ff, double bw, int32_t top, diag_line *out) {
    int32_t n = 0;
    for (int kd = 0; kd < N_KINDS; kd++) {
        int race = kd == K_OUTER || kd == K_INNER;
        double tol = race ? DIAG_TOL_RACE : DIAG_TOL_ELEMENT;
        int32_t hmax = race ? DIAG_MAX_HARMONICS : DIAG_ELEMENT_HARMONICS;
        for (int32_t h = 1; h <= hmax; h++) {
            double f = h * ff->f[kd];
            if (h > 1 && f > top * bw) break;
            out[n++] = (diag_line){kd, h, f, bw / 2 + tol * f, tol, 0};
        }
    }
    for (int32_t i = 0; i < n; i++) out[i].excluded = predicted_by_other(out, n, out[i].kind, out[i].f, out[i].hw);
    return n;
}

/* The last bin the diagnosis reads: 5 x BPFI (the floor's top, past every tested line). */
static int32_t diag_top(int32_t n, double bw, const fault_freqs *ff) {
    int64_t top = floor_i(5 * ff->bpfi / bw);
    return top > n / 2 - 1 ? n / 2 - 1 : top < 2 ? 2 : (int32_t)top;
}

/* The largest p within [centre - hw, centre + hw] (bins 2..top, shaft harmonics aside): its bin,
 * or -1; *w the bins looked at. */
static int32_t line_peak(const float *p, double bw, int32_t top, double centre, double hw, int32_t *w) {
    int32_t k0, k1, at = -1;
    bin_range(centre - hw, centre + hw, bw, 2, top, &k0, &k1);
    *w = 0;
    for (int32_t k = k0; k <= k1; k++) {
        if (bin_shaft[k]) continue;
        (*w)++;
        if (at < 0 || p[k] > p[at]) at = k;
    }
    return at;
}

/* A sideband's r2 over the floor: its window's peak (*at) if that is a local maximum of the
 * spectrum (a carrier's skirt falls away from it: not a line), else 0. */
static double sideband(const float *p, double floor2, double bw, int32_t top, double centre, double hw,
                       int32_t *at, int32_t *w) {
    *at = line_peak(p, bw, top, centre, hw, w);
    if (*at < 0 || !(floor2 > 0)) return 0;
    int32_t a = *at;
    if (!(p[a] > p[a - 1] && (a + 1 > dg.mtop || p[a] >= p[a + 1]))) return 0;
    return p[a] / floor2;
}

/* The r2 of the peak at bin `at` over its local continuum: the median of the bins within
 * spacing/2 of it (at most SIDEBAND_LOCAL each side), at least the floor. A line on a carrier's
 * skirt must stand above the skirt. Never more than the r2 over the floor. */
#define SIDEBAND_LOCAL 32
static double over_continuum(const float *p, double floor2, double bw, int32_t at, double spacing) {
    int64_t half = floor_i(spacing / 2 / bw);
    if (half > SIDEBAND_LOCAL) half = SIDEBAND_LOCAL;
    double ref2 = floor2;
    if (half >= 1 && at - half >= 1 && at + half <= dg.mtop) {
        float copy[2 * SIDEBAND_LOCAL + 1];
        int32_t m = 0;
        for (int64_t k = at - half; k <= at + half; k++) copy[m++] = p[k];
        double med = ap_median_f32(copy, m);
        if (med > ref2) ref2 = med;
    }
    return p[at] / ref2;
}

static double excess(double r2) { return r2 > 1 ? r2 - 1 : 0; }

#define DIAG_SIDEBANDS (4 * DIAG_MAX_HARMONICS)
/* One channel's confidences from the ring's mean p (power per bin, bins 0..mtop). */
static void diag_channel_eval(const float *p, double floor2, int32_t top, double bw, const fault_freqs *ff,
                              const diag_line *lines, int32_t nlines, int32_t k, diag_channel *out) {
    double total = 0;                   /* the unambiguous power above the floor, bins 2..top */
    for (int32_t b = 2; b <= top; b++) {
        double r2 = floor2 > 0 ? p[b] / floor2 : 0;
        if (!bin_shaft[b] && !bin_shared[b] && r2 > 1) total += r2 - 1;
    }
    for (int kd = 0; kd < N_KINDS; kd++) {
        /* carriers: the part's own (not shared), and for the inner race its shared ones too (only
         * for their sidebands: the +-fr comb is the inner race's alone) */
        double c_r2[DIAG_MAX_HARMONICS], c_tol[DIAG_MAX_HARMONICS];
        int32_t c_at[DIAG_MAX_HARMONICS], c_h[DIAG_MAX_HARMONICS], c_own[DIAG_MAX_HARMONICS], nc = 0;
        double c_max = 0, acc = 0, best_c = -1;
        int32_t c_bins = 0, at_best = -1;
        for (int32_t i = 0; i < nlines; i++) {
            const diag_line *l = &lines[i];
            if (l->kind != kd || (l->excluded && kd != K_INNER)) continue;
            int32_t w, at = line_peak(p, bw, top, l->f, l->hw, &w);
            if (at < 0) continue;
            double r2 = floor2 > 0 ? p[at] / floor2 : 0;
            c_r2[nc] = r2; c_at[nc] = at; c_h[nc] = l->h; c_tol[nc] = l->tol; c_own[nc] = !l->excluded; nc++;
            if (l->excluded) continue;
            c_bins += w;
            if (r2 > c_max) c_max = r2;
            acc += excess(r2) * presence(r2, w, k);
            if (r2 > best_c) { best_c = r2; at_best = at; }
        }
        out->peak_hz[kd] = at_best >= 0 ? at_best * bw : 0;
        out->peak_ratio[kd] = best_c > 0 ? ap_sqrt(best_c) : 0;
        out->conf[kd] = out->signature[kd] = 0;
        if (at_best < 0 || !(total > 0)) continue;
        double carriers_present = presence(c_max, c_bins, k);
        if (!(carriers_present > 0)) continue;          /* no carrier: confidence 0 whatever the sidebands */
        /* sidebands at the measured carrier +- each modulation (a comb of spacing mods[0]); one on a
         * line another part predicts is not tested */
        double mods[2];
        int32_t nm = 0;
        if (kd == K_OUTER) mods[nm++] = ff->fr;
        if (kd == K_INNER) { mods[nm++] = ff->fr; mods[nm++] = 2 * ff->fr; }
        if (kd == K_BALL) mods[nm++] = ff->ftf;
        double s_r2[DIAG_SIDEBANDS], s_pres[DIAG_SIDEBANDS];
        int32_t s_c[DIAG_SIDEBANDS], s_m[DIAG_SIDEBANDS], s_side[DIAG_SIDEBANDS], s_w[DIAG_SIDEBANDS], s_at[DIAG_SIDEBANDS];
        int32_t ns = 0;
        for (int32_t c = 0; c < nc; c++)
            for (int32_t m = 0; m < nm; m++) {
                double hw = bw + c_tol[c] * mods[m], cap = mods[0] / 2 - bw;
                if (hw > cap) hw = cap;
                if (hw < bw / 2) continue;                  /* the comb is not resolved */
                for (int side = -1; side <= 1; side += 2) {
                    if (sb_skip[kd][c_h[c]][m][side > 0]) continue;   /* on another part's carrier */
                    int32_t w, at;
                    double r = sideband(p, floor2, bw, top, c_at[c] * bw + side * mods[m], hw, &at, &w);
                    if (!w) continue;
                    s_r2[ns] = r; s_at[ns] = at; s_w[ns] = w; s_c[ns] = c; s_m[ns] = m; s_side[ns] = side; ns++;
                }
            }
        for (int32_t i = 0; i < ns; i++) {   /* every window tried; over the local continuum (<= over the floor) */
            s_pres[i] = presence(s_r2[i], s_w[i] * ns, k);
            if (s_pres[i] > 0) s_pres[i] = presence(over_continuum(p, floor2, bw, s_at[i], mods[0]), s_w[i] * ns, k);
        }
        double evidence = 0;
        if (kd == K_INNER || kd == K_BALL) {
            for (int32_t i = 0; i < ns; i++) {
                acc += excess(s_r2[i]) * s_pres[i];
                if (kd == K_INNER) { if (s_pres[i] > evidence) evidence = s_pres[i]; continue; }
                for (int32_t j = 0; j < ns; j++)   /* the ball: a -/+ pair at one carrier */
                    if (s_c[j] == s_c[i] && s_m[j] == s_m[i] && s_side[i] < s_side[j]) {
                        double e = s_pres[i] < s_pres[j] ? s_pres[i] : s_pres[j];
                        if (e > evidence) evidence = e;
                    }
            }
        } else if (kd == K_OUTER) {                          /* shaft-rate AM: a -/+ pair, its depth */
            for (int32_t i = 0; i < ns; i++)
                for (int32_t j = 0; j < ns; j++) {
                    if (s_c[j] != s_c[i] || s_m[j] != s_m[i] || s_side[i] >= s_side[j]) continue;
                    double ac = ap_sqrt(excess(c_r2[s_c[i]]));
                    double depth = ac > 0 ? (ap_sqrt(excess(s_r2[i])) + ap_sqrt(excess(s_r2[j]))) / ac : 1;
                    if (depth > 1) depth = 1;
                    double e = (s_pres[i] < s_pres[j] ? s_pres[i] : s_pres[j]) * depth;
                    if (e > evidence) evidence = e;
                }
        }
        double factor = kd == K_INNER || kd == K_BALL ? evidence : kd == K_OUTER ? 1 - evidence : 1;
        double signature = carriers_present * factor;               /* how likely the signature is there */
        double conf = signature * (kd == K_CAGE ? 0.5 : 1) * acc / total;
        out->signature[kd] = signature;
        out->conf[kd] = conf > 1 ? 1 : conf;
    }
}

/* The kurtogram's band per channel: the 1/3-binary tree of Antoni's fast kurtogram (1, 2, 3,
 * 4, 6, 8, 12, ... equal bands over [0, fs/2)), bands at least 4 x BPFI wide (room for BPFI's
 * first harmonic and its sidebands twice over), starting at KURT_LOW_EDGE x BPFI or above (the
 * fault lines themselves, and the machine's loud low-frequency vibration, stay out of the band)
 * and ending below fs/2.56 (the usable band of an acquisition whose anti-alias filter starts
 * there). Among those whose mean power is at least KURT_ABOVE_FLOOR x the noise floor (the
 * median bin power from KURT_LOW_EDGE x BPFI to fs/2.56: a resonance that impacts ring stands
 * above it; a quiet band where electrical spikes are impulsive does not), the largest SK wins
 * (ties: the wider, earlier band) if it is significant: over the taper's 2r - 2 by KURT_SK_SIGMAS x
 * the SK's noise std 2/sqrt(bins) (Gaussian noise). Otherwise the envelope band. The spectra it
 * reads are of the tapered windows (tapered_spectra). */
#define KURT_TAPER 20                   /* the kurtogram's window: cosine ramps over n/20 (5 %) at each end */
static float taper[N_MAX / KURT_TAPER + 1];
static int32_t taper_n, taper_len;
static double taper_r;                  /* n sum w^4 / (sum w^2)^2: tapered complex Gaussian noise has SK 2r - 2 */

static void taper_for(int32_t n) {
    if (taper_n == n) return;
    taper_len = n / KURT_TAPER;
    double s2 = n - 2 * taper_len, s4 = s2;
    for (int32_t j = 0; j < taper_len; j++) {
        double sn, cs;
        ap_sincos(AP_PI * j / taper_len, &sn, &cs);
        double w = 0.5 * (1 - cs);
        taper[j] = (float)w;
        s2 += 2 * w * w;
        s4 += 2 * w * w * w * w;
    }
    taper_r = n * s4 / (s2 * s2);
    taper_n = n;
}

/* The spectra the kurtogram reads, into espec (free by then): each channel's mean-removed window,
 * tapered (a rectangular window's edges make loud low-frequency vibration leak into the bands
 * above it as one impulse per window, at the wrap: a high SK that is no bearing's). */
static void tapered_spectra(const ap_window_header *h, const channel_result *r, int32_t n, uint32_t channels) {
    taper_for(n);
    for (uint32_t c = 0; c < channels; c++) {
        const float *x = ap_window_channel(h, c);
        float *out = xd + (size_t)c * n;
        double mean = r[c].mean;
        for (int32_t j = 0; j < n; j++) {
            double w = j < taper_len ? taper[j] : j >= n - taper_len ? taper[n - 1 - j] : 1;
            out[j] = (float)(((double)x[j] - mean) * w);
        }
    }
    ap_rfft_batch(xd, espec, n, (int32_t)channels);
}

static void kurtogram_bands(int32_t n, uint32_t channels, double bw, double fs, const fault_freqs *ff,
                            int32_t k0_fixed, int32_t k1_fixed, const ap_window_header *h, const channel_result *res) {
    static ap_band bands[AP_BANDS_MAX];
    static double sk[AP_MAX_CHANNELS * AP_BANDS_MAX], power[AP_MAX_CHANNELS * AP_BANDS_MAX];
    int32_t nb = 0, half = n / 2;
    double low = KURT_LOW_EDGE * ff->bpfi;
    for (int32_t level = 0; level < 24 && nb < AP_BANDS_MAX - 1; level++) {
        int32_t count = level == 0 ? 1 : (level & 1) ? 1 << ((level + 1) / 2) : 3 << (level / 2 - 1);
        if (count > half || (double)half / count * bw < 4 * ff->bpfi) break;
        for (int32_t i = 0; i < count && nb < AP_BANDS_MAX - 1; i++) {
            int32_t k0 = (int32_t)((int64_t)i * half / count), k1 = (int32_t)((int64_t)(i + 1) * half / count) - 1;
            if (k0 < 1) k0 = 1;
            if (k1 > half - 1 || (k1 + 1) * bw > fs / 2.56 || k1 < k0 || k0 * bw < low) continue;
            bands[nb++] = (ap_band){k0, k1, 0};
        }
    }
    for (uint32_t c = 0; c < channels; c++) { dg.k0[c] = k0_fixed; dg.k1[c] = k1_fixed; }
    int64_t ku = floor_i(fs / 2.56 / bw) - 1, kl = -floor_i(-low / bw);
    if (ku > half - 1) ku = half - 1;
    if (kl < 1) kl = 1;
    if (!nb || ku < kl) return;
    tapered_spectra(h, res, n, channels);
    ap_band_power(espec, n, (int32_t)channels, bands, nb, power);
    ap_band_kurtosis(espec, n, (int32_t)channels, bands, nb, cfg.diag_whiten ? AP_ENV_WHITEN : 0, sk);
    for (uint32_t c = 0; c < channels; c++) {
        const float *X = espec + (size_t)c * (n + 2);
        for (int64_t k = kl; k <= ku; k++) kpow[k] = (float)ap_bin_power(X, (int32_t)k);
        double floor;
        ap_median_rows(&kpow[kl], (int32_t)(ku - kl + 1), 1, (int32_t)(ku - kl + 1), &floor, scratch);
        int32_t best = -1;
        for (int32_t b = 0; b < nb; b++) {
            int32_t bins = bands[b].k1 - bands[b].k0 + 1;
            if (power[c * nb + b] / bins < KURT_ABOVE_FLOOR * floor) continue;
            if (sk[c * nb + b] < 2 * taper_r - 2 + KURT_SK_SIGMAS * 2 / ap_sqrt((double)bins)) continue;
            if (best < 0 || sk[c * nb + b] > sk[c * nb + best]) best = b;
        }
        if (best < 0) continue;
        dg.k0[c] = bands[best].k0;
        dg.k1[c] = bands[best].k1;
    }
}

/* This window's diagnostic spectra into the ring, the ring's mean, and each channel's
 * confidences. The fault frequencies are those of the median speed estimate of the windows in
 * the ring (fr_window: this window's), not the longer track's: lines and speed come from the
 * same stretch of time. t: the window's start (s). */
static void diag_update(const ap_window_header *h, const channel_result *res, int32_t n, uint32_t channels,
                        double bw, double fs, double env_lo, double env_hi,
                        double fr_window, double t, fault_freqs *ff, const fault_freqs *ff_track, diag_channel *out) {
    int32_t k0, k1;
    bin_range(env_lo, env_hi, bw, 0, n / 2, &k0, &k1);
    /* The ring covers the bins any speed of the configured range reads (its top at the highest). */
    fault_freqs fmax;
    fault_frequencies(cfg.fixed_rpm ? cfg.rpm / 60 : cfg.rpm_max / 60, &fmax);
    int32_t mtop = diag_top(n, bw, &fmax);
    if (dg.n != n || dg.fs != fs || dg.channels != channels || dg.mtop != mtop) {
        dg.count = 0; dg.n = n; dg.fs = fs; dg.channels = channels; dg.mtop = mtop;
        int32_t cap = DIAG_RING_FLOATS / ((int32_t)channels * (mtop + 1));
        dg.capacity = cap < 1 ? 1 : cap > cfg.diag_windows ? cfg.diag_windows : cap;
        if (dg.capacity < cfg.diag_windows && !dg.warned) {
            ap_log(AP_LOG_WARNING, "diagnosis.windows is more than the ring holds at this window shape: fewer averaged");
            dg.warned = 1;
        }
    }
    /* A window that overlaps the last diagnosed one adds little (and is not independent of it:
     * the noise law wants independent windows): the ring takes windows at least a window apart,
     * and in between the last verdict stands. At the usual half-overlap, every other window. */
    double window_s = (double)n / fs;
    double since = dg.count > 0 ? t - dg.times[(dg.next + dg.capacity - 1) % dg.capacity] : -1;
    if (since >= 0 && since < window_s - 0.5 / fs) {   /* half a sample: the header's times are whole ns; a
                                                          clock that went back is not skipped (diagnosis_dof) */
        if (!cfg.fixed_rpm) *ff = dg_ff;
        for (uint32_t c = 0; c < channels; c++) out[c] = dg_out[c];
        return;
    }
    /* The kurtogram chooses the band when the ring starts and again each time it has turned
     * over, until two choices in a row agree (then the band holds for the event: the resonance a
     * defect rings is the structure's); a band other than the ring's restarts it (the mean
     * averages one band's spectra). */
    int kurtogram_ran = 0;
    if (cfg.diag_kurtogram) {
        if (dg.count == 0 || (!dg.band_confirmed && dg.band_age >= dg.capacity)) {
            kurtogram_ran = 1;
            int32_t old0[AP_MAX_CHANNELS], old1[AP_MAX_CHANNELS], changed = 0, turnover = dg.count > 0;
            for (uint32_t c = 0; c < channels; c++) { old0[c] = dg.k0[c]; old1[c] = dg.k1[c]; }
            kurtogram_bands(n, channels, bw, fs, ff_track, k0, k1, h, res);
            for (uint32_t c = 0; c < channels; c++) changed |= old0[c] != dg.k0[c] || old1[c] != dg.k1[c];
            if (changed) dg.count = 0;
            dg.band_confirmed = turnover && !changed;
            dg.band_age = 0;
        }
        dg.band_age++;
    } else {
        for (uint32_t c = 0; c < channels; c++) { dg.k0[c] = k0; dg.k1[c] = k1; }
    }
    int32_t flags = (cfg.diag_squared ? AP_ENV_SQUARED : 0) | (cfg.diag_whiten ? AP_ENV_WHITEN : 0);
    int same = 1;
    for (uint32_t c = 1; c < channels; c++) same &= dg.k0[c] == dg.k0[0] && dg.k1[c] == dg.k1[0];
    /* The envelope band, plain: espec already holds those spectra (the window's features), unless
     * the kurtogram used it just now. */
    int reuse = same && flags == 0 && !kurtogram_ran && dg.k0[0] == k0 && dg.k1[0] == k1;
    if (reuse) {
    } else if (same) ap_envelope_ex(spec, xd, n, (int32_t)channels, dg.k0[0], dg.k1[0], flags);
    else
        for (uint32_t c = 0; c < channels; c++)
            ap_envelope_ex(spec + (size_t)c * (n + 2), xd + (size_t)c * n, n, 1, dg.k0[c], dg.k1[c], flags);
    if (!reuse) ap_rfft_batch(xd, espec, n, (int32_t)channels);

    if (dg.count == 0) {                           /* a new ring: its sums from nothing */
        dg.next = 0;
        for (uint32_t c = 0; c < channels; c++)
            for (int32_t k = 0; k <= mtop; k++) dsum[c][k] = 0;
    }
    int32_t slot = dg.next, row = mtop + 1, full = dg.count == dg.capacity;
    float scale = 4.0f / ((float)n * (float)n);   /* (2 |E_k| / n)^2 */
    for (uint32_t c = 0; c < channels; c++) {      /* the new spectrum in, the one it replaces out of the sums */
        const float *e = espec + (size_t)c * (n + 2);
        float *r = ring + ((size_t)slot * channels + c) * row;
        double *sum = dsum[c];
        for (int32_t k = 0; k <= mtop; k++) {
            float pk = scale * (e[2 * k] * e[2 * k] + e[2 * k + 1] * e[2 * k + 1]);
            sum[k] += full ? (double)pk - r[k] : (double)pk;
            r[k] = pk;
        }
    }
    dg.speeds[slot] = fr_window;
    dg.times[slot] = t;
    dg.next = (slot + 1) % dg.capacity;
    if (dg.count < dg.capacity) dg.count++;
    if (!cfg.fixed_rpm) {
        double copy[64];
        for (int32_t i = 0; i < dg.count; i++) copy[i] = dg.speeds[i];
        fault_frequencies(ap_median_f64(copy, dg.count), ff);
    }
    int32_t top = diag_top(n, bw, ff);
    if (top > mtop) top = mtop;
    for (uint32_t c = 0; c < channels; c++)
        for (int32_t k = 0; k <= mtop; k++) davg[c][k] = (float)(dsum[c][k] / dg.count);
    double floors[AP_MAX_CHANNELS];
    ap_median_rows(&davg[0][2], top - 1, (int32_t)channels, AMP_ROW, floors, scratch);
    dg.dof = diagnosis_dof(window_s);
    diag_line lines[DIAG_LINES];
    int32_t nlines = diag_lines(ff, bw, top, lines);
    for (int32_t b = 0; b <= top; b++) {           /* the machine's lines, and the ones two parts share */
        double f = b * bw;
        int64_t h = floor_i(f / ff->fr + 0.5);
        bin_shaft[b] = h >= 1 && ap_fabs(f - (double)h * ff->fr) <= bw / 2 + DIAG_TOL_RACE * (double)h * ff->fr;
        bin_shared[b] = 0;
    }
    for (int32_t i = 0; i < nlines; i++) {
        if (!lines[i].excluded) continue;
        int32_t a, z;
        bin_range(lines[i].f - lines[i].hw, lines[i].f + lines[i].hw, bw, 0, top, &a, &z);
        for (int32_t b = a; b <= z; b++) bin_shared[b] = 1;
    }
    for (int32_t i = 0; i < nlines; i++) {         /* the sidebands that sit on another part's carrier */
        const diag_line *l = &lines[i];
        double mods[2] = {l->kind == K_BALL ? ff->ftf : ff->fr, 2 * ff->fr};
        for (int m = 0; m < 2; m++) {
            double hw = bw + l->tol * mods[m], cap = mods[0] / 2 - bw;
            if (hw > cap) hw = cap;
            for (int up = 0; up < 2; up++)
                sb_skip[l->kind][l->h][m][up] = (uint8_t)predicted_by_other(lines, nlines, l->kind,
                                                                            l->f + (up ? 1 : -1) * mods[m], hw);
        }
    }
    for (uint32_t c = 0; c < channels; c++) {
        diag_channel_eval(davg[c], floors[c], top, bw, ff, lines, nlines, dg.dof, &out[c]);
        dg_out[c] = out[c];
    }
    dg_ff = *ff;
}
