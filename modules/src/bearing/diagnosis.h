/* bearing: the diagnosis - each part's signature in the envelope spectrum, its confidence, the
 * kurtogram's band and the running mean of the event's spectra. Part of bearing.c (one
 * translation unit, included once after features.h). reference.py is the same in numpy. */

/* ---- diagnosis: the part's signature in the envelope spectrum -------------------------------- */

/* Once a window is anomalous, and for as long as its event story lasts, each window's diagnostic
 * envelope spectrum (diagnosis.band: the envelope band, or the kurtogram's; diagnosis.prewhiten:
 * cepstrum pre-whitening; diagnosis.envelope: magnitude or squared) goes into a ring of the last
 * diagnosis.windows spectra, and each part's signature is scored on their mean (noise averages
 * out, lines stay):
 *
 *   outer race  BPFO and its harmonics up to 5 BPFI, x (1 - shaft-rate modulation): a sideband at
 *               +-fr, present (noise law) and as deep as 2 x its amplitude over the carrier's
 *               (above the floor), takes that share off (a stationary defect is not modulated)
 *   inner race  BPFI and its harmonics up to 5 BPFI, x the presence of a +-fr / +-2 fr sideband
 *               (the defect turns with the shaft through the load zone)
 *   ball        2 x BSF h = 1..3, x the presence of a -FTF / +FTF pair at one harmonic (both: the
 *               sidebands sit a few bins off the carrier, where a slipping carrier's skirt is)
 *   cage        FTF h = 1..3, weak evidence on its own: half weight
 *
 * A carrier is the largest power within bw/2 + tol x f of its frequency f (tol 1 % for the races,
 * 2 % for ball and cage, whose elements slip), shaft harmonics aside (the machine's lines), over
 * the median of the mean from bin 2 to 5 x BPFI (the floor): its ratio r2. A carrier two parts
 * both predict (3 x BPFO and 2 x BPFI lie 0.7 % apart) is evidence for neither and is left out,
 * of the part's lines and of the total. A sideband is looked for at the measured carrier +- the
 * modulation, within min(bw + tol x m, spacing/2 - bw) (spacing: the comb's, fr or FTF), shaft
 * harmonics aside, and counts only as a local maximum of the spectrum (a skirt falls away from
 * the carrier: not a line), against the same floor as the carrier. Presence of a group of lines: one minus the chance that noise alone
 * puts its strongest line that high in that many bins (every window tried), from the noise law
 * of the mean of K_eff windows (power ~ Gamma(K_eff, mean/K_eff); K_eff corrects K for the
 * windows' overlap). Confidence of a part: presence of its carriers x its sideband factor x the
 * share of the spectrum's unambiguous power above the floor that its lines carry. A part is
 * named when its confidence is at least diagnosis.min_confidence and beats the runner-up by
 * diagnosis.margin. */

#define DIAG_TOL_RACE 0.01
#define DIAG_TOL_ELEMENT 0.02
#define DIAG_MAX_HARMONICS 16           /* of a race's line, up to 5 x BPFI (5..7 for common bearings) */
#define DIAG_ELEMENT_HARMONICS 3        /* of the ball's and the cage's: slip widens their windows with h */
#define DIAG_LINES (2 * DIAG_MAX_HARMONICS + 2 * DIAG_ELEMENT_HARMONICS)
#define DIAG_RING_FLOATS (1 << 18)      /* the ring of spectra: at most this many floats (1 MiB) */
#define KURT_LOW_EDGE 6.0               /* x BPFI: a candidate band starts one BPFI above the top line */
#define KURT_ABOVE_FLOOR 4.0            /* its mean power: 6 dB over the noise floor (judgement, bearing.md) */
#define KURT_SK_SIGMAS 5.0              /* its SK: 5 x the noise std 2/sqrt(bins), else the fixed band */

static float ring[DIAG_RING_FLOATS];            /* the last spectra: slot s, channel c at (s*channels + c)*(mtop+1) */
static float davg[AP_MAX_CHANNELS][AMP_ROW];    /* their mean (power per bin) */
static uint8_t bin_shaft[AMP_ROW], bin_shared[AMP_ROW];
static float kpow[AMP_ROW];                     /* the kurtogram's bin powers */
static struct {
    int32_t count, next, capacity;      /* spectra in the ring, the slot the next one takes, its size */
    int32_t band_age;                   /* windows since the kurtogram chose the bands */
    double speeds[64], times[64];       /* per slot: the window's speed estimate (Hz), its start (s) */
    int32_t n, mtop;
    uint32_t channels;
    double fs;
    int32_t k0[AP_MAX_CHANNELS], k1[AP_MAX_CHANNELS];   /* the diagnostic band per channel */
    int32_t dof;
    int warned;
} dg;

typedef struct {
    double conf[N_KINDS], peak_hz[N_KINDS], peak_ratio[N_KINDS];
} diag_channel;

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
 * Wilson-Hilferty), e^-x sum_{j<K} x^j/j!, x = K r2 m_K, summed in log space (no overflow). */
static double noise_tail(double r2, int32_t k) {
    double mk = k == 1 ? 0.69314718055994530942 : 1 - 1.0 / (3.0 * k);
    double x = k * r2 * mk;
    if (!(x > 0)) return 1;
    double lx = ap_ln(x), lt = 0, logs[64], top = 0;
    logs[0] = 0;
    for (int32_t j = 1; j < k; j++) {
        lt += lx - ap_ln((double)j);
        logs[j] = lt;
        if (lt > top) top = lt;
    }
    double sum = 0;
    for (int32_t j = 0; j < k; j++) sum += ap_exp(logs[j] - top);
    return ap_exp(-x + top + ap_ln(sum));
}

/* 1 - (bins) x the noise tail, at least 0: the strongest of a group of lines is not noise. */
static double presence(double r2, int32_t bins, int32_t k) {
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

/* A sideband's r2: its window's peak if that is a local maximum of the spectrum, else 0. */
static double sideband(const float *p, double floor2, double bw, int32_t top, double centre, double hw, int32_t *w) {
    int32_t at = line_peak(p, bw, top, centre, hw, w);
    if (at < 0 || !(floor2 > 0)) return 0;
    int peak = p[at] > p[at - 1] && (at + 1 > dg.mtop || p[at] >= p[at + 1]);
    return peak ? p[at] / floor2 : 0;
}

static double excess(double r2) { return r2 > 1 ? r2 - 1 : 0; }

/* One channel's confidences from the ring's mean p (power per bin, bins 0..mtop). */
static void diag_channel_eval(const float *p, double floor2, int32_t top, double bw, const fault_freqs *ff,
                              const diag_line *lines, int32_t nlines, int32_t k, diag_channel *out) {
    double total = 0;                   /* the unambiguous power above the floor, bins 2..top */
    for (int32_t b = 2; b <= top; b++) {
        double r2 = floor2 > 0 ? p[b] / floor2 : 0;
        if (!bin_shaft[b] && !bin_shared[b] && r2 > 1) total += r2 - 1;
    }
    for (int kd = 0; kd < N_KINDS; kd++) {
        double c_max = 0, acc = 0, best_c = -1, c_r2[DIAG_MAX_HARMONICS];
        int32_t c_bins = 0, nc = 0, at_best = -1, c_at[DIAG_MAX_HARMONICS], c_h[DIAG_MAX_HARMONICS];
        double c_tol = 0;
        for (int32_t i = 0; i < nlines; i++) {
            const diag_line *l = &lines[i];
            if (l->kind != kd || l->excluded) continue;
            int32_t w, at = line_peak(p, bw, top, l->f, l->hw, &w);
            if (at < 0) continue;
            double r2 = floor2 > 0 ? p[at] / floor2 : 0;
            c_bins += w;
            if (r2 > c_max) c_max = r2;
            acc += excess(r2) * presence(r2, w, k);
            if (r2 > best_c) { best_c = r2; at_best = at; }
            c_r2[nc] = r2; c_at[nc] = at; c_h[nc] = l->h; nc++;
            c_tol = l->tol;
        }
        out->peak_hz[kd] = at_best >= 0 ? at_best * bw : 0;
        out->peak_ratio[kd] = best_c > 0 ? ap_sqrt(best_c) : 0;
        if (!nc || !(total > 0)) { out->conf[kd] = 0; continue; }
        /* sidebands at the measured carrier +- each modulation, in pairs (see above) */
        double mods[2];
        int32_t nm = 0;
        if (kd == K_OUTER) mods[nm++] = ff->fr;
        if (kd == K_INNER) { mods[nm++] = ff->fr; mods[nm++] = 2 * ff->fr; }
        if (kd == K_BALL) mods[nm++] = ff->ftf;
        double lo[2 * DIAG_MAX_HARMONICS], hi[2 * DIAG_MAX_HARMONICS], rc[2 * DIAG_MAX_HARMONICS];
        int32_t wl[2 * DIAG_MAX_HARMONICS], wu[2 * DIAG_MAX_HARMONICS], np = 0;
        for (int32_t c = 0; c < nc; c++)
            for (int32_t m = 0; m < nm; m++) {
                double hw = bw + c_tol * mods[m], cap = mods[0] / 2 - bw;
                if (hw > cap) hw = cap;
                if (hw < bw / 2) continue;                  /* the comb is not resolved */
                double nominal = c_h[c] * ff->f[kd];
                if (predicted_by_other(lines, nlines, kd, nominal - mods[m], hw) ||
                    predicted_by_other(lines, nlines, kd, nominal + mods[m], hw)) continue;
                lo[np] = sideband(p, floor2, bw, top, c_at[c] * bw - mods[m], hw, &wl[np]);
                hi[np] = sideband(p, floor2, bw, top, c_at[c] * bw + mods[m], hw, &wu[np]);
                rc[np] = c_r2[c];
                if (wl[np] && wu[np]) np++;
            }
        double evidence = 0;
        for (int32_t i = 0; i < np; i++) {
            double pl = presence(lo[i], wl[i] * 2 * np, k), pu = presence(hi[i], wu[i] * 2 * np, k);
            if (kd == K_INNER || kd == K_BALL) {
                double e = kd == K_INNER ? (pl > pu ? pl : pu) : (pl < pu ? pl : pu);
                if (e > evidence) evidence = e;
                acc += excess(lo[i]) * pl + excess(hi[i]) * pu;
            } else if (kd == K_OUTER) {
                double ac = ap_sqrt(excess(rc[i]));
                for (int s = 0; s < 2; s++) {
                    double r = s ? hi[i] : lo[i], pr = s ? pu : pl;
                    double depth = ac > 0 ? 2 * ap_sqrt(excess(r)) / ac : 1;
                    if (depth > 1) depth = 1;
                    if (pr * depth > evidence) evidence = pr * depth;
                }
            }
        }
        double factor = kd == K_INNER || kd == K_BALL ? evidence : kd == K_OUTER ? 1 - evidence : 0.5;
        double conf = presence(c_max, c_bins, k) * factor * acc / total;
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
 * (ties: the wider, earlier band) if it is significant: KURT_SK_SIGMAS x the SK's noise std
 * 2/sqrt(bins) (Gaussian noise). Otherwise the envelope band. */
static void kurtogram_bands(int32_t n, uint32_t channels, double bw, double fs, const fault_freqs *ff,
                            int32_t k0_fixed, int32_t k1_fixed) {
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
    ap_band_power(spec, n, (int32_t)channels, bands, nb, power);
    ap_band_kurtosis(spec, n, (int32_t)channels, bands, nb, cfg.diag_whiten ? AP_ENV_WHITEN : 0, sk);
    for (uint32_t c = 0; c < channels; c++) {
        const float *X = spec + (size_t)c * (n + 2);
        for (int64_t k = kl; k <= ku; k++) kpow[k] = (float)ap_bin_power(X, (int32_t)k);
        double floor;
        ap_median_rows(&kpow[kl], (int32_t)(ku - kl + 1), 1, (int32_t)(ku - kl + 1), &floor, scratch);
        int32_t best = -1;
        for (int32_t b = 0; b < nb; b++) {
            int32_t bins = bands[b].k1 - bands[b].k0 + 1;
            if (power[c * nb + b] / bins < KURT_ABOVE_FLOOR * floor) continue;
            if (sk[c * nb + b] < KURT_SK_SIGMAS * 2 / ap_sqrt((double)bins)) continue;
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
static void diag_update(int32_t n, uint32_t channels, double bw, double fs, double env_lo, double env_hi,
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
    /* The kurtogram chooses the band when the ring starts and again each time it has turned
     * over; a band other than the ring's restarts it (the mean averages one band's spectra). */
    if (cfg.diag_kurtogram) {
        if (dg.count == 0 || dg.band_age >= dg.capacity) {
            int32_t old0[AP_MAX_CHANNELS], old1[AP_MAX_CHANNELS];
            for (uint32_t c = 0; c < channels; c++) { old0[c] = dg.k0[c]; old1[c] = dg.k1[c]; }
            kurtogram_bands(n, channels, bw, fs, ff_track, k0, k1);
            for (uint32_t c = 0; c < channels; c++)
                if (old0[c] != dg.k0[c] || old1[c] != dg.k1[c]) dg.count = 0;
            dg.band_age = 0;
        }
        dg.band_age++;
    } else {
        for (uint32_t c = 0; c < channels; c++) { dg.k0[c] = k0; dg.k1[c] = k1; }
    }
    int32_t flags = (cfg.diag_squared ? AP_ENV_SQUARED : 0) | (cfg.diag_whiten ? AP_ENV_WHITEN : 0);
    int same = 1;
    for (uint32_t c = 1; c < channels; c++) same &= dg.k0[c] == dg.k0[0] && dg.k1[c] == dg.k1[0];
    if (same) ap_envelope_ex(spec, xd, n, (int32_t)channels, dg.k0[0], dg.k1[0], flags);
    else
        for (uint32_t c = 0; c < channels; c++)
            ap_envelope_ex(spec + (size_t)c * (n + 2), xd + (size_t)c * n, n, 1, dg.k0[c], dg.k1[c], flags);
    ap_rfft_batch(xd, espec, n, (int32_t)channels);

    if (dg.count == 0) dg.next = 0;
    int32_t slot = dg.next, row = mtop + 1;
    float scale = 4.0f / ((float)n * (float)n);   /* (2 |E_k| / n)^2 */
    for (uint32_t c = 0; c < channels; c++) {
        const float *e = espec + (size_t)c * (n + 2);
        float *r = ring + ((size_t)slot * channels + c) * row;
        for (int32_t k = 0; k <= mtop; k++) r[k] = scale * (e[2 * k] * e[2 * k] + e[2 * k + 1] * e[2 * k + 1]);
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
        for (int32_t k = 0; k <= mtop; k++) {
            double s = 0;
            for (int32_t i = 0; i < dg.count; i++) s += ring[((size_t)i * channels + c) * row + k];
            davg[c][k] = (float)(s / dg.count);
        }
    double floors[AP_MAX_CHANNELS];
    ap_median_rows(&davg[0][2], top - 1, (int32_t)channels, AMP_ROW, floors, scratch);
    dg.dof = diagnosis_dof((double)n / fs);
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
    for (uint32_t c = 0; c < channels; c++)
        diag_channel_eval(davg[c], floors[c], top, bw, ff, lines, nlines, dg.dof, &out[c]);
}
