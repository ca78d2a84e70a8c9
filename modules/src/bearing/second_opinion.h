/* bearing: the second opinion of the embedded bearing_cnn. Part of bearing.c (one translation
 * unit, included once after diagnosis.h). */

/* ---- second opinion: the trained bearing_cnn ------------------------------------------------- */

/* The CNN knows one rig (the CWRU drive-end bearing at 1720-1800 rpm), 1024 samples at 12 kHz,
 * and four classes; it runs only when an event is raised or escalates (diagnosis.second_opinion=bearing_cnn), on the
 * channel the diagnosis looked at, over every 1024-sample slice of the window (at 12 kHz, or at a
 * whole multiple of it decimated in the spectrum: its bins up to 6 kHz, inverse transformed at
 * the lower rate, the mean added back). It names a part only where the envelope signature named
 * none, only the signature's own top candidate (ahead of the runner-up), and with its mean
 * probability at least diagnosis.cnn_min_p: it confirms the signature's lead, it never names a
 * part the signature's evidence does not point to (it says "ball" at p 0.94-0.97 on synthetic
 * race faults), and it never un-names the signature's part. Any other vote is listed in the
 * message as a candidate. */
enum { CNN_NORMAL, CNN_INNER, CNN_OUTER, CNN_BALL, CNN_CLASSES };
static const int cnn_kind[CNN_CLASSES] = {-1, K_INNER, K_OUTER, K_BALL};
static const char *const cnn_names[CNN_CLASSES] = {"normal", "inner", "outer", "ball"};
static float cnn_half[N_MAX / 2 + 2];    /* the decimated signal's half spectrum */
static float cnn_sig[N_MAX];             /* the channel at 12 kHz */

/* Mean probabilities over the slices into p; the number of slices (0: the CNN cannot look). */
static int32_t cnn_probs(const ap_window_header *h, uint32_t c, int32_t n, double fs, const channel_result *r,
                         double *p) {
    for (int k = 0; k < CNN_CLASSES; k++) p[k] = 0;
    double ratio = fs / 12000.0;
    int32_t d = (int32_t)(ratio + 0.5);
    if (d < 1 || ap_fabs(ratio - d) > 1e-9 * ratio || n / d < NN_INPUT_FLOATS) return 0;
    int32_t m = n / d;
    const float *x = ap_window_channel(h, c);
    if (d > 1) {
        const float *X = spec + (size_t)c * (n + 2);
        float scale = (float)m / (float)n;
        for (int32_t k = 0; k <= m / 2; k++) { cnn_half[2 * k] = X[2 * k] * scale; cnn_half[2 * k + 1] = X[2 * k + 1] * scale; }
        cnn_half[m + 1] = 0;                          /* the new Nyquist bin is real */
        ap_irfft(cnn_half, cnn_sig, m);
        for (int32_t j = 0; j < m; j++) cnn_sig[j] += (float)r->mean;
        x = cnn_sig;
    }
    int32_t slices = m / NN_INPUT_FLOATS;
    float out[NN_OUTPUT_FLOATS];
    for (int32_t s = 0; s < slices; s++) {
        float *in = nn_input();
        for (int32_t j = 0; j < NN_INPUT_FLOATS; j++) in[j] = x[s * NN_INPUT_FLOATS + j];
        nn_forward();
        nn_collect(out);
        for (int k = 0; k < CNN_CLASSES; k++) p[k] += out[k];
    }
    for (int k = 0; k < CNN_CLASSES; k++) p[k] /= slices;
    return slices;
}

