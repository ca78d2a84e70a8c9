/* bearing: the diagnosis - each part's signature in the envelope spectrum, its confidence, the
 * kurtogram's band and the running mean of the event's spectra. Part of bearing.c (one
 * translation unit, included once after features.h). */

/* ---- diagnosis: the part's signature in the squared envelope spectrum ----------------------- */

/* Once a window is anomalous, and for as long as its event story lasts, each window's diagnostic
 * envelope spectrum (diagnosis.band: the envelope band, or the band of largest spectral kurtosis;
 * diagnosis.prewhiten: cepstrum pre-whitening; diagnosis.envelope: magnitude or squared) joins a
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
    int32_t band_age;                   /* windows since the kurtogram chose the bands */
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
    double f, hw, spacing;              /* spacing: of a sideband comb (fr, or FTF for the ball) */
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
                out[n++] = (diag_line){kd, 0, h, f - mods[m], hw, mods[0], 0};
                out[n++] = (diag_line){kd, 0, h, f + mods[m], hw, mods[0], 0};
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
 * neighbours in the comb (mean of the bins at f -+ spacing/2): a carrier broadened by slip has
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
        int64_t a = floor_i((l->f - l->spacing / 2) / bw + 0.5), b = floor_i((l->f + l->spacing / 2) / bw + 0.5);
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
    if (dg.n != n || dg.fs != fs) { dg.count = 0; dg.n = n; dg.fs = fs; }
    /* The kurtogram chooses the band when the running mean starts and again each time it has
     * turned over (diagnosis.windows windows): the mean averages one band's spectra, and the
     * resonance a defect rings is the structure's, not the window's. */
    if (cfg.diag_kurtogram) {
        if (dg.count == 0 || dg.band_age >= cfg.diag_windows) {
            kurtogram_bands(n, channels, bw, fs, ff, k0, k1);
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

