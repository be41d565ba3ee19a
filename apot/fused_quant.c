/* Fused CPU passes of the APoT / uniform quantizers (apot/fused.py builds and loads this file).
 *
 * Every function walks n float32 elements in memory order, so it serves any dense layout (NCHW or
 * channels_last) as long as all its arrays share that layout. The projection is apot.quant.project's:
 *     P(u) = levels[#{i : mids[i] < u}]      (ties to the lower level; NaN to levels[0])
 * computed as a chain of compare-and-select over the sorted midpoints (no gathers, so it vectorizes). The
 * levels and midpoints are read from the layer's lookup table (apot.quant.lookup_table): row 0 holds the
 * midpoints (+inf elsewhere) in increasing order, row 1 of bin 0 the lowest level, row 2 of a midpoint's bin
 * the level above it.
 * "keep(u)" is the hardtanh_backward mask of apot.quant._keep_within: !(u <= low || u >= high), with low and
 * high already moved one float outwards by the caller.
 * Compiled without -ffast-math and with -ffp-contract=off: every operation is the IEEE one torch does.
 * The alpha gradients are summed in double.
 */
#include <math.h>
#include <stdint.h>

#define MAX_MIDS 64
#define BLOCK 256          /* elements per block: u, P(u) of a block stay in registers / L1 */
#define PARALLEL_MIN 32768 /* fewer elements run on one thread */

typedef struct {
    int count;
    float mids[MAX_MIDS];
    float levels[MAX_MIDS + 1];
} LevelSet;

static LevelSet read_table(const float *table, int bins) {
    LevelSet s;
    s.count = 0;
    s.levels[0] = table[bins];
    for (int k = 0; k < bins && s.count < MAX_MIDS; k++) {
        if (table[k] != INFINITY) {
            s.mids[s.count] = table[k];
            s.levels[s.count + 1] = table[2 * bins + k];
            s.count++;
        }
    }
    return s;
}

/* q[j] = P(u[j]) for j < m. */
static inline void project_block(const float *restrict u, float *restrict q, int64_t m, const LevelSet *s) {
    for (int64_t j = 0; j < m; j++) q[j] = s->levels[0];
    for (int i = 0; i < s->count; i++) {
        const float mid = s->mids[i], level = s->levels[i + 1];
        for (int64_t j = 0; j < m; j++) q[j] = u[j] > mid ? level : q[j];
    }
}

static inline int keep(float u, float low, float high) { return !(u <= low || u >= high); }

#define LANES 16
/* sum over j < m of g[j] (q[j] - u[j] keep(u[j])), in double, in LANES independent partial sums (so it
 * vectorizes without reassociating any one sum), then added lane by lane. */
static inline double slope_dot(const float *restrict g, const float *restrict u, const float *restrict q,
                               int64_t m, float low, float high) {
    double lane[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= m; j += LANES)
        for (int l = 0; l < LANES; l++)
            lane[l] += (double)g[j + l] * (double)(q[j + l] - (keep(u[j + l], low, high) ? u[j + l] : 0.0f));
    for (; j < m; j++) lane[0] += (double)g[j] * (double)(q[j] - (keep(u[j], low, high) ? u[j] : 0.0f));
    double sum = 0.0;
    for (int l = 0; l < LANES; l++) sum += lane[l];
    return sum;
}

/* u[j] = (x[j] - shift) / scale for j < m: the activation quantizer's x / alpha (shift 0, exact: x - 0 is x),
 * the weight quantizer's standardised (w - mean) / (std alpha). */
static inline void load_block(const float *restrict x, float *restrict u, int64_t m, float shift, float scale) {
    for (int64_t j = 0; j < m; j++) u[j] = (x[j] - shift) / scale;
}

/* Forward: out = alpha * P((x - shift) / scale). */
void quant_forward(const float *restrict x, float *restrict out, int64_t n, float shift, float scale, float alpha,
                   const float *table, int bins, int threads) {
    const LevelSet s = read_table(table, bins);
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= PARALLEL_MIN)
    for (int64_t b = 0; b < blocks; b++) {
        float u[BLOCK], q[BLOCK];
        const int64_t start = b * BLOCK, m = n - start < BLOCK ? n - start : BLOCK;
        load_block(x + start, u, m, shift, scale);
        project_block(u, q, m, &s);
        for (int64_t j = 0; j < m; j++) out[start + j] = q[j] * alpha;
    }
}

/* Backward, u = (x - shift) / scale: grad_x = g keep(u) when mask_grad (the activation's clipped straight-
 * through estimator), else g / grad_div (the weight's, through the standardisation); grad_x may be NULL.
 * Returns sum g (P(u) - u keep(u)), the alpha gradient before its scale. */
double quant_backward(const float *restrict x, const float *restrict g, float *restrict grad_x, int64_t n,
                      float shift, float scale, float grad_div, int mask_grad, const float *table, int bins,
                      float low, float high, int threads) {
    const LevelSet s = read_table(table, bins);
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
    double total = 0.0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : total) if (n >= PARALLEL_MIN)
    for (int64_t b = 0; b < blocks; b++) {
        float u[BLOCK], q[BLOCK];
        const int64_t start = b * BLOCK, m = n - start < BLOCK ? n - start : BLOCK;
        load_block(x + start, u, m, shift, scale);
        project_block(u, q, m, &s);
        if (grad_x && mask_grad)
            for (int64_t j = 0; j < m; j++) grad_x[start + j] = keep(u[j], low, high) ? g[start + j] : 0.0f;
        else if (grad_x)
            for (int64_t j = 0; j < m; j++) grad_x[start + j] = g[start + j] / grad_div;
        total += slope_dot(g + start, u, q, m, low, high);
    }
    return total;
}
