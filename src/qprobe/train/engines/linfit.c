/* The training loop of a linear probe, in C: Adam steps over batches of feature rows.
 *
 * Why C. A linear probe's step is two matrix-vector products over a batch (scores s = X w, then
 * the weight gradient X^T dL/ds) and a little arithmetic per unit. On a 2-core CPU the products
 * are bound by memory traffic, and at the paper's MBPP size (22,272 rows x 4096 dims, 150 epochs,
 * 3,450 steps) the Python and torch dispatch around them (~0.5 ms a step) cost as much as the
 * products themselves. Here a whole epoch runs in one call: no Python between steps.
 *
 * What it computes is engines/torch_step.py's fused step (the torch reference, used where this
 * file cannot be built): the batch is cut into `shards` runs of whole units (q/ce: a row, pg: a
 * group, bt: a pair, dpo: a prompt); each shard reads its rows in cache-sized blocks of whole
 * units: s = X_blk w + bias, dL/ds of each unit in closed form (the same formulas as the
 * objectives' `grad` in qprobe/train/objectives.py), then grad += X_blk^T dL/ds
 * while the block is still in cache. The shards' gradients are summed in shard order and Adam
 * (or AdamW) updates the probe in place, exactly as torch.optim.Adam computes it. With two
 * threads the shards run at the same time and each thread updates half of the weights; the
 * result is the same bits as with one thread.
 *
 * Feature rows are float16 (read directly, F16C converts 8 values per instruction) or float32;
 * arithmetic is float32 with FMA for the products and float64 for the per-unit terms.
 * Built on first use by native.py (next to this file) with the system C compiler. Functions that
 * use AVX2 carry their own target attribute, so the library loads on any x86-64 CPU; native.py
 * only calls it after qprobe_linfit_supported() says the CPU has AVX2, FMA and F16C, and after
 * checking that this file's interface is the one it mirrors (qprobe_linfit_abi,
 * qprobe_linfit_field and qprobe_linfit_objective at the end of this file).
 *
 * Adding an objective here: a code in the enum below, its name in qprobe_linfit_objective, its
 * case in unit_grad (and batch_scale if its loss is a mean over something else), and the code as
 * `native` in its registry entry.
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define TARGET __attribute__((target("avx2,fma,f16c")))
#define MAX_SHARDS 8
/* The interface's version: raise it with any change to Fit, Part, the objective codes or the
 * exported functions' signatures, together with ABI in native.py. */
#define LINFIT_ABI 1

/* The objective codes: `native` in qprobe/train/objectives.py's registry entries. */
enum { OBJ_Q, OBJ_CE, OBJ_PG, OBJ_BT, OBJ_DPO, OBJ_COUNT };

/* One training run, laid out by qprobe/train/data.py; mirrored by native.py's _Fit. */
typedef struct {
    const void *x;               /* [L, D] feature rows, float16 (half = 1) or float32 */
    int64_t half, dim;
    const float *reward;         /* [L] q/ce/pg: reward of each row */
    const int64_t *unit_start;   /* [U + 1] first row of each unit */
    const int64_t *shard_units;  /* [B, shards + 1] first unit of each shard of each batch */
    const double *batch_const;   /* [B] added to the batch's summed loss (pg: its baselines) */
    const int64_t *pair_start;   /* dpo: [U + 1] first pair of each unit (prompt) */
    const int64_t *pair_rows;    /* dpo: [P, 2] chosen and rejected row, relative to the unit */
    int64_t objective, shards, threads, block_rows, max_unit_rows;
    double beta;
    float *w, *bias;             /* [D], [1]: the probe, updated in place */
    float *m_w, *v_w, *m_b, *v_b;  /* Adam moments of w [D] and bias [1] */
    double lr, beta1, beta2, eps, weight_decay;
    int64_t decoupled;           /* 1: AdamW (decoupled weight decay) */
    int64_t step;                /* Adam's step count; advanced by every step taken */
} Fit;

int qprobe_linfit_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}

/* --- matrix-vector products on float16 or float32 rows ---------------------------------------- */
TARGET static inline __m256 load8(const void *x, int64_t i, int half) {
    return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i)))
                : _mm256_loadu_ps((const float *)x + i);
}

TARGET static inline float load1(const void *x, int64_t i, int half) {
    return half ? _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(((const uint16_t *)x)[i])))
                : ((const float *)x)[i];
}

/* out[i] = bias + sum_d x[i, d] w[d] for i < rows; x row-major [rows, dim]. */
TARGET static void dot_rows(const void *x, int half, int64_t rows, int64_t dim, const float *w,
                            float bias, float *out) {
    const int64_t d32 = dim - dim % 32, d8 = dim - dim % 8;
    for (int64_t i = 0; i < rows; i++) {
        const int64_t r = i * dim;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        int64_t d = 0;
        for (; d < d32; d += 32) {
            a0 = _mm256_fmadd_ps(load8(x, r + d, half), _mm256_loadu_ps(w + d), a0);
            a1 = _mm256_fmadd_ps(load8(x, r + d + 8, half), _mm256_loadu_ps(w + d + 8), a1);
            a2 = _mm256_fmadd_ps(load8(x, r + d + 16, half), _mm256_loadu_ps(w + d + 16), a2);
            a3 = _mm256_fmadd_ps(load8(x, r + d + 24, half), _mm256_loadu_ps(w + d + 24), a3);
        }
        for (; d < d8; d += 8) a0 = _mm256_fmadd_ps(load8(x, r + d, half), _mm256_loadu_ps(w + d), a0);
        __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        float s = _mm_cvtss_f32(h);
        for (; d < dim; d++) s += load1(x, r + d, half) * w[d];
        out[i] = bias + s;
    }
}

/* acc[d] += sum_i g[i] x[i, d] for d < dim; rows eight at a time (one pass over acc per eight),
 * then the rest one by one. */
TARGET static void add_rows(const void *x, int half, int64_t rows, int64_t dim, const float *g,
                            float *acc) {
    const int64_t d8 = dim - dim % 8;
    int64_t i = 0;
    for (; i + 8 <= rows; i += 8) {
        const int64_t r = i * dim;
        __m256 gk[8];
        for (int k = 0; k < 8; k++) gk[k] = _mm256_set1_ps(g[i + k]);
        int64_t d = 0;
        for (; d < d8; d += 8) {  /* two chains of four: a fixed order, short dependencies */
            __m256 a = _mm256_mul_ps(gk[0], load8(x, r + d, half));
            __m256 b = _mm256_mul_ps(gk[1], load8(x, r + dim + d, half));
            a = _mm256_fmadd_ps(gk[2], load8(x, r + 2 * dim + d, half), a);
            b = _mm256_fmadd_ps(gk[3], load8(x, r + 3 * dim + d, half), b);
            a = _mm256_fmadd_ps(gk[4], load8(x, r + 4 * dim + d, half), a);
            b = _mm256_fmadd_ps(gk[5], load8(x, r + 5 * dim + d, half), b);
            a = _mm256_fmadd_ps(gk[6], load8(x, r + 6 * dim + d, half), a);
            b = _mm256_fmadd_ps(gk[7], load8(x, r + 7 * dim + d, half), b);
            _mm256_storeu_ps(acc + d, _mm256_add_ps(_mm256_loadu_ps(acc + d), _mm256_add_ps(a, b)));
        }
        for (; d < dim; d++) {
            float a = 0.0f;
            for (int k = 0; k < 8; k++) a += g[i + k] * load1(x, r + k * dim + d, half);
            acc[d] += a;
        }
    }
    for (; i < rows; i++) {
        const int64_t r = i * dim;
        const __m256 gi = _mm256_set1_ps(g[i]);
        int64_t d = 0;
        for (; d < d8; d += 8)
            _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(gi, load8(x, r + d, half),
                                                      _mm256_loadu_ps(acc + d)));
        for (; d < dim; d++) acc[d] += g[i] * load1(x, r + d, half);
    }
}

/* Exported for the tests: the two products on float16 rows. */
TARGET void qprobe_dot_rows(const uint16_t *x, int64_t rows, int64_t dim, const float *w,
                            const float *bias, float *out) {
    dot_rows(x, 1, rows, dim, w, bias[0], out);
}

TARGET void qprobe_add_rows(const uint16_t *x, int64_t rows, int64_t dim, const float *g,
                            float *acc) {
    add_rows(x, 1, rows, dim, g, acc);
}

/* --- dL/ds of one unit ------------------------------------------------------------------------ */
/* softplus(z), and sigmoid(z) into *sig, from one exponential e = exp(-|z|). */
static double softplus_sigmoid(double z, double *sig) {
    const double e = exp(-fabs(z));
    *sig = z >= 0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
    return fmax(z, 0.0) + log1p(e);
}

/* dpo, one prompt of n rows (scores s) and its pairs: g[i] = dL/ds_i; returns the summed loss.
 * u = s / beta; for a pair (w, l) with c = logsumexp of u over the prompt's other rows:
 * m = log sigmoid(u_w - c) - log sigmoid(u_l - c), loss softplus(-beta m), and with
 * dm = -scale sigmoid(-beta m): g_w += dm sigmoid(c - u_w), g_l -= dm sigmoid(c - u_l),
 * g_j += dm (sigmoid(c - u_l) - sigmoid(c - u_w)) softmax_j(u_others) for every other row j.
 * The others' sum is the prompt's total minus the pair's two terms, so a prompt costs
 * O(rows + pairs); when the pair dominates the total, the others are summed on their own. */
static double dpo_unit(const Fit *f, const float *s, int64_t n, const int64_t *pairs,
                       int64_t npairs, double scale, float *g, double *e, double *acc) {
    const double beta = f->beta;
    double top = -INFINITY, total = 0.0, on_others = 0.0, loss = 0.0;
    for (int64_t i = 0; i < n; i++) top = fmax(top, s[i] / beta);
    for (int64_t i = 0; i < n; i++) {
        e[i] = exp(s[i] / beta - top);
        total += e[i];
        acc[i] = 0.0;
    }
    for (int64_t p = 0; p < npairs; p++) {
        const int64_t w = pairs[2 * p], l = pairs[2 * p + 1];
        if (n <= 2) {  /* no other sample: the policy is p0 whatever Q is; no signal */
            loss += log(2.0);
            continue;
        }
        double rest = total - e[w] - e[l], c, own_top = top;
        const int direct = !(rest > 1e-6 * total);
        if (direct) {  /* cancellation or underflow: the others' logsumexp on their own */
            own_top = -INFINITY;
            for (int64_t j = 0; j < n; j++)
                if (j != w && j != l) own_top = fmax(own_top, s[j] / beta);
            rest = 0.0;
            for (int64_t j = 0; j < n; j++)
                if (j != w && j != l) rest += exp(s[j] / beta - own_top);
        }
        c = own_top + log(rest);
        double aw, al, sm;  /* sigmoid(c - u_w), sigmoid(c - u_l), sigmoid(-beta m) */
        const double zw = s[w] / beta - c, zl = s[l] / beta - c;
        const double m = softplus_sigmoid(-zl, &al) - softplus_sigmoid(-zw, &aw);
        loss += softplus_sigmoid(-beta * m, &sm);  /* m = log sig(zw) - log sig(zl) */
        const double dm = -scale * sm, coef = dm * (al - aw);
        acc[w] += dm * aw;
        acc[l] -= dm * al;
        if (direct) {
            for (int64_t j = 0; j < n; j++)
                if (j != w && j != l) acc[j] += coef * exp(s[j] / beta - c);
        } else {  /* every row gets coef e_j / rest below; take it back from the pair */
            on_others += coef / rest;
            acc[w] -= coef * e[w] / rest;
            acc[l] -= coef * e[l] / rest;
        }
    }
    for (int64_t i = 0; i < n; i++) g[i] = (float)(acc[i] + on_others * e[i]);
    return loss;
}

/* g[0:n] = dL/ds of unit u (rows with scores s[0:n]) times `scale`; returns its summed loss. */
static double unit_grad(const Fit *f, int64_t u, const float *s, double scale, float *g,
                        double *tmp) {
    const int64_t first = f->unit_start[u], n = f->unit_start[u + 1] - first;
    const float *r = f->reward + first;
    double loss = 0.0;
    switch (f->objective) {
    case OBJ_Q:
        for (int64_t i = 0; i < n; i++) {
            const double d = (double)s[i] - r[i];
            loss += d * d;
            g[i] = (float)(2.0 * scale * d);
        }
        return loss;
    case OBJ_CE:
        for (int64_t i = 0; i < n; i++) {
            const double z = s[i];
            double sig;
            loss += softplus_sigmoid(z, &sig) - z * r[i];
            g[i] = (float)(scale * (sig - r[i]));
        }
        return loss;
    case OBJ_PG: {  /* p = softmax(s / beta); g_i = -(scale / beta) p_i (r_i - sum_j p_j r_j) */
        double top = -INFINITY, z = 0.0, ev = 0.0;
        for (int64_t i = 0; i < n; i++) top = fmax(top, s[i] / f->beta);
        for (int64_t i = 0; i < n; i++) z += tmp[i] = exp(s[i] / f->beta - top);
        for (int64_t i = 0; i < n; i++) ev += (tmp[i] /= z) * r[i];
        for (int64_t i = 0; i < n; i++) g[i] = (float)(-scale / f->beta * tmp[i] * (r[i] - ev));
        return -ev;
    }
    case OBJ_BT: {  /* rows: chosen, rejected; loss -log sigmoid(s_w - s_l) */
        double sig;
        const double loss = softplus_sigmoid((double)s[1] - s[0], &sig);
        g[0] = (float)(-scale * sig);
        g[1] = (float)(scale * sig);
        return loss;
    }
    default: {
        const int64_t p0 = f->pair_start[u], p1 = f->pair_start[u + 1];
        return dpo_unit(f, s, n, f->pair_rows + 2 * p0, p1 - p0, scale, g, tmp, tmp + n);
    }
    }
}

/* --- one step ------------------------------------------------------------------------------- */
typedef struct {
    float *s, *g;   /* [max block rows] scores and dL/ds of the block */
    float *gw;      /* [D] this shard's weight gradient */
    double *tmp;    /* [2 x max unit rows] per-unit scratch */
    double loss, gsum;
} Shard;

static double batch_scale(const Fit *f, int64_t u0, int64_t u1) {
    if (f->objective == OBJ_Q || f->objective == OBJ_CE)
        return 1.0 / (double)(f->unit_start[u1] - f->unit_start[u0]);  /* mean over rows */
    if (f->objective == OBJ_DPO)
        return 1.0 / (double)(f->pair_start[u1] - f->pair_start[u0]);  /* over pairs */
    return 1.0 / (double)(u1 - u0);  /* pg: over groups; bt: over pairs */
}

/* Units [u0, u1) of a batch: the shard's gradient into sh->gw, its loss and sum of dL/ds. */
TARGET static void shard_grad(const Fit *f, int64_t u0, int64_t u1, double scale, Shard *sh) {
    const int64_t dim = f->dim, esize = f->half ? 2 : 4;
    memset(sh->gw, 0, sizeof(float) * dim);
    sh->loss = sh->gsum = 0.0;
    for (int64_t u = u0; u < u1;) {
        const int64_t r0 = f->unit_start[u];
        int64_t end = u + 1;  /* a block: whole units, at most block_rows rows (or one unit) */
        while (end < u1 && f->unit_start[end + 1] - r0 <= f->block_rows) end++;
        const int64_t rows = f->unit_start[end] - r0;
        const void *xb = (const char *)f->x + r0 * dim * esize;
        dot_rows(xb, (int)f->half, rows, dim, f->w, f->bias[0], sh->s);
        for (int64_t v = u; v < end; v++) {
            const int64_t at = f->unit_start[v] - r0;
            sh->loss += unit_grad(f, v, sh->s + at, scale, sh->g + at, sh->tmp);
        }
        if (f->objective == OBJ_Q || f->objective == OBJ_CE)
            for (int64_t i = 0; i < rows; i++) sh->gsum += sh->g[i];
        add_rows(xb, (int)f->half, rows, dim, sh->g, sh->gw);
        u = end;
    }
}

/* Adam on weights [d0, d1) with the gradient summed over the shards in order (as torch). */
static void adam(const Fit *f, int64_t t, float *p, float *m, float *v, Shard *sh, int64_t d0,
                 int64_t d1, float bias_grad, int is_bias) {
    const float b1 = (float)f->beta1, b2 = (float)f->beta2, eps = (float)f->eps;
    const float step = (float)(f->lr / (1.0 - pow(f->beta1, (double)t)));
    const float root_bc2 = (float)sqrt(1.0 - pow(f->beta2, (double)t));
    const float wd = (float)f->weight_decay, decay = (float)(1.0 - f->lr * f->weight_decay);
    for (int64_t d = d0; d < d1; d++) {
        float g = is_bias ? bias_grad : sh[0].gw[d];
        if (!is_bias)
            for (int64_t j = 1; j < f->shards; j++) g += sh[j].gw[d];
        if (wd != 0.0f && f->decoupled) p[d] *= decay;
        else if (wd != 0.0f) g += wd * p[d];
        m[d] += (1.0f - b1) * (g - m[d]);  /* torch's lerp */
        v[d] = v[d] * b2 + (1.0f - b2) * g * g;
        p[d] -= step * m[d] / (sqrtf(v[d]) / root_bc2 + eps);
    }
}

typedef struct {
    Fit *f;
    const int64_t *order;  /* batches to take, in this order */
    int64_t nsteps;
    double *losses;        /* [nsteps] loss of each step */
    Shard *shards;
    int64_t id, threads;   /* this thread, of how many */
    pthread_barrier_t *barrier;
} Worker;

static void *run_steps(void *arg) {
    Worker *k = arg;
    Fit *f = k->f;
    const int64_t nt = k->threads, S = f->shards, dim = f->dim;
    for (int64_t i = 0; i < k->nsteps; i++) {
        const int64_t *su = f->shard_units + k->order[i] * (S + 1);
        const double scale = batch_scale(f, su[0], su[S]);
        for (int64_t j = k->id; j < S; j += nt) shard_grad(f, su[j], su[j + 1], scale, &k->shards[j]);
        if (nt > 1) pthread_barrier_wait(k->barrier);
        const int64_t t = f->step + i + 1, d0 = dim * k->id / nt, d1 = dim * (k->id + 1) / nt;
        adam(f, t, f->w, f->m_w, f->v_w, k->shards, d0, d1, 0.0f, 0);
        if (k->id == 0) {
            double loss = f->batch_const[k->order[i]], gb = 0.0;
            for (int64_t j = 0; j < S; j++) {
                loss += k->shards[j].loss;
                gb += k->shards[j].gsum;
            }
            k->losses[i] = loss * scale;
            /* pg/bt/dpo compare scores within a unit: their bias gradient is exactly 0 */
            adam(f, t, f->bias, f->m_b, f->v_b, k->shards, 0, 1, (float)gb, 1);
        }
        if (nt > 1) pthread_barrier_wait(k->barrier);
    }
    return NULL;
}

/* Take nsteps Adam steps, on batches order[0], order[1], ...; losses[i] = loss of step i.
 * Returns 0, or -1 when the settings are invalid or memory could not be had (nothing changed).
 * With threads = 2 and no second thread to be had, the steps run on one: the same result. */
int qprobe_linfit_steps(Fit *f, const int64_t *order, int64_t nsteps, double *losses) {
    const int64_t S = f->shards, dimp = f->dim + 16 + f->dim % 2;  /* even: doubles align */
    int64_t rows = f->block_rows > f->max_unit_rows ? f->block_rows : f->max_unit_rows;
    rows += rows % 2;
    if (S < 1 || S > MAX_SHARDS || f->threads < 1 || f->threads > 2 || f->threads > S) return -1;
    Shard sh[MAX_SHARDS];
    float *mem = NULL;
    const int64_t per = dimp + 2 * rows + 4 * f->max_unit_rows;  /* floats per shard */
    if (posix_memalign((void **)&mem, 64, sizeof(float) * per * S) != 0) return -1;
    for (int64_t j = 0; j < S; j++) {
        sh[j].gw = mem + j * per;
        sh[j].s = sh[j].gw + dimp;
        sh[j].g = sh[j].s + rows;
        sh[j].tmp = (double *)(sh[j].g + rows);
    }
    pthread_barrier_t barrier;
    Worker k[2];
    pthread_t other;
    int64_t nt = f->threads;
    if (nt == 2 && pthread_barrier_init(&barrier, NULL, 2) != 0) nt = 1;
    for (int64_t id = 0; id < nt; id++)
        k[id] = (Worker){f, order, nsteps, losses, sh, id, nt, &barrier};
    if (nt == 2 && pthread_create(&other, NULL, run_steps, &k[1]) != 0) {
        pthread_barrier_destroy(&barrier);
        nt = 1;
        k[0].threads = 1;
    }
    run_steps(&k[0]);
    if (nt == 2) {
        pthread_join(other, NULL);
        pthread_barrier_destroy(&barrier);
    }
    f->step += nsteps;
    free(mem);
    return 0;
}

/* --- setup: feature statistics and the standardised training matrix --------------------------- */
/* Two passes over the training rows, both bound by memory traffic: at the paper's MBPP size
 * torch took ~0.3 s for them, a tenth of the whole training budget. Mirrored by native.py's
 * _Part. */
typedef struct {
    const void *x;          /* [N, D] the dataset's features, float16 (in_half) or float32 */
    int64_t in_half, dim;
    const int64_t *rows;    /* [n] which rows, in this order */
    int64_t n;
    const float *shift;     /* sums: subtracted before summing (keeps the variance exact) */
    double *sum, *sumsq;    /* sums: [D] totals over this part's rows */
    const float *mean, *inv_std;  /* standardise: [D] */
    void *out;              /* standardise: [n, D] float16 (out_half) or float32 */
    int64_t out_half, bad;  /* bad: a value was NaN or infinite */
} Part;

#define CHUNK 256  /* rows summed in float32 before going into the float64 totals */

TARGET static void *column_sums(void *arg) {
    Part *p = arg;
    const int64_t dim = p->dim, d8 = dim - dim % 8;
    float *part = NULL;
    if (posix_memalign((void **)&part, 64, sizeof(float) * 2 * (dim + 8)) != 0) {
        p->bad = -1;
        return NULL;
    }
    float *part2 = part + dim + 8;
    for (int64_t c = 0; c < p->n; c += CHUNK) {
        memset(part, 0, sizeof(float) * 2 * (dim + 8));
        for (int64_t i = c; i < p->n && i < c + CHUNK; i++) {
            const int64_t r = p->rows[i] * dim;
            int64_t d = 0;
            for (; d < d8; d += 8) {
                const __m256 v = _mm256_sub_ps(load8(p->x, r + d, (int)p->in_half),
                                               _mm256_loadu_ps(p->shift + d));
                _mm256_storeu_ps(part + d, _mm256_add_ps(_mm256_loadu_ps(part + d), v));
                _mm256_storeu_ps(part2 + d, _mm256_fmadd_ps(v, v, _mm256_loadu_ps(part2 + d)));
            }
            for (; d < dim; d++) {
                const float v = load1(p->x, r + d, (int)p->in_half) - p->shift[d];
                part[d] += v;
                part2[d] += v * v;
            }
        }
        for (int64_t d = 0; d < dim; d++) {
            p->sum[d] += part[d];
            p->sumsq[d] += part2[d];
        }
    }
    free(part);
    return NULL;
}

TARGET static void *standardise(void *arg) {
    Part *p = arg;
    const int64_t dim = p->dim, d8 = dim - dim % 8;
    __m256 nan_seen = _mm256_setzero_ps();  /* v * 0 is 0 for finite v, NaN otherwise */
    float tail_seen = 0.0f;
    for (int64_t i = 0; i < p->n; i++) {
        const int64_t r = p->rows[i] * dim, o = i * dim;
        int64_t d = 0;
        for (; d < d8; d += 8) {
            const __m256 x = load8(p->x, r + d, (int)p->in_half);
            nan_seen = _mm256_add_ps(nan_seen, _mm256_mul_ps(x, _mm256_setzero_ps()));
            const __m256 v = _mm256_mul_ps(_mm256_sub_ps(x, _mm256_loadu_ps(p->mean + d)),
                                           _mm256_loadu_ps(p->inv_std + d));
            if (p->out_half)
                _mm_storeu_si128((__m128i *)((uint16_t *)p->out + o + d),
                                 _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
            else
                _mm256_storeu_ps((float *)p->out + o + d, v);
        }
        for (; d < dim; d++) {
            const float x = load1(p->x, r + d, (int)p->in_half);
            const float v = (x - p->mean[d]) * p->inv_std[d];
            tail_seen += x * 0.0f;
            if (p->out_half)
                ((uint16_t *)p->out)[o + d] = (uint16_t)_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
            else
                ((float *)p->out)[o + d] = v;
        }
    }
    float seen[8];
    _mm256_storeu_ps(seen, nan_seen);
    for (int k = 0; k < 8; k++) tail_seen += seen[k];
    p->bad = tail_seen != 0.0f;  /* NaN != 0 */
    return NULL;
}

/* Run fn on the two halves of the rows (parts[0], parts[1]), on two threads when asked. */
static void on_halves(void *(*fn)(void *), Part parts[2], int64_t threads) {
    pthread_t other;
    if (threads >= 2 && pthread_create(&other, NULL, fn, &parts[1]) == 0) {
        fn(&parts[0]);
        pthread_join(other, NULL);
    } else {
        fn(&parts[0]);
        fn(&parts[1]);
    }
}

static void halves(const Part *p, Part parts[2]) {
    parts[0] = parts[1] = *p;
    parts[0].n = p->n / 2;
    parts[1].rows = p->rows + parts[0].n;
    parts[1].n = p->n - parts[0].n;
}

/* sum[d], sumsq[d] = sums of (x[r, d] - shift[d]) and its square over the rows r in p->rows
 * (p->sum and p->sumsq [D] zeroed by the caller; two halves summed in order: any thread count
 * gives the same bits). Returns 0, or -1 when memory could not be had. */
int qprobe_column_sums(Part *p, int64_t threads) {
    Part parts[2];
    halves(p, parts);
    double *more = calloc(2 * (size_t)p->dim, sizeof(double));
    if (more == NULL) return -1;
    parts[1].sum = more;
    parts[1].sumsq = more + p->dim;
    on_halves(column_sums, parts, threads);
    for (int64_t d = 0; d < p->dim; d++) {
        p->sum[d] += more[d];
        p->sumsq[d] += more[p->dim + d];
    }
    free(more);
    return parts[0].bad || parts[1].bad ? -1 : 0;
}

/* out[i] = (x[rows[i]] - mean) * inv_std, rounded to float16 if out_half. Returns 1 if the
 * rows hold a NaN or an infinity (out is then garbage), else 0. */
int qprobe_standardise(Part *p, int64_t threads) {
#ifdef MADV_HUGEPAGE
    /* A fresh [n, D] output is first touched here: in 2 MB pages, not 4 kB ones, that is ~500
     * page faults instead of ~45,000 at the paper's MBPP size (a third of this pass's time). */
    const uintptr_t huge = 2u << 20, start = ((uintptr_t)p->out + huge - 1) & ~(huge - 1);
    const uintptr_t end = ((uintptr_t)p->out + (uintptr_t)(p->n * p->dim * (p->out_half ? 2 : 4)))
                          & ~(huge - 1);
    if (end > start) madvise((void *)start, end - start, MADV_HUGEPAGE);  /* a hint: may fail */
#endif
    Part parts[2];
    halves(p, parts);
    parts[1].out = (char *)p->out + parts[0].n * p->dim * (p->out_half ? 2 : 4);
    on_halves(standardise, parts, threads);
    return parts[0].bad || parts[1].bad;
}

/* --- the interface, for native.py's check at load ----------------------------------------------- */
int64_t qprobe_linfit_abi(void) { return LINFIT_ABI; }

typedef struct {
    const char *name;
    int64_t offset;
} Field;

#define FIELD(type, f) {#f, (int64_t)offsetof(type, f)}
static const Field FIT_FIELDS[] = {
    FIELD(Fit, x), FIELD(Fit, half), FIELD(Fit, dim), FIELD(Fit, reward), FIELD(Fit, unit_start),
    FIELD(Fit, shard_units), FIELD(Fit, batch_const), FIELD(Fit, pair_start),
    FIELD(Fit, pair_rows), FIELD(Fit, objective), FIELD(Fit, shards), FIELD(Fit, threads),
    FIELD(Fit, block_rows), FIELD(Fit, max_unit_rows), FIELD(Fit, beta), FIELD(Fit, w),
    FIELD(Fit, bias), FIELD(Fit, m_w), FIELD(Fit, v_w), FIELD(Fit, m_b), FIELD(Fit, v_b),
    FIELD(Fit, lr), FIELD(Fit, beta1), FIELD(Fit, beta2), FIELD(Fit, eps),
    FIELD(Fit, weight_decay), FIELD(Fit, decoupled), FIELD(Fit, step)};
static const Field PART_FIELDS[] = {
    FIELD(Part, x), FIELD(Part, in_half), FIELD(Part, dim), FIELD(Part, rows), FIELD(Part, n),
    FIELD(Part, shift), FIELD(Part, sum), FIELD(Part, sumsq), FIELD(Part, mean),
    FIELD(Part, inv_std), FIELD(Part, out), FIELD(Part, out_half), FIELD(Part, bad)};

/* Field i of a struct (which = 0: Fit, 1: Part) in declaration order: its name, and its offset
 * into *offset; NULL past the end. i = -1: "sizeof" and the struct's size. */
const char *qprobe_linfit_field(int64_t which, int64_t i, int64_t *offset) {
    const Field *f = which == 0 ? FIT_FIELDS : PART_FIELDS;
    const int64_t n = which == 0 ? (int64_t)(sizeof FIT_FIELDS / sizeof *f)
                                 : (int64_t)(sizeof PART_FIELDS / sizeof *f);
    if ((which != 0 && which != 1) || i < -1 || i >= n) return NULL;
    if (i == -1) {
        *offset = which == 0 ? (int64_t)sizeof(Fit) : (int64_t)sizeof(Part);
        return "sizeof";
    }
    *offset = f[i].offset;
    return f[i].name;
}

/* The registry name of objective `code` (as in qprobe/train/objectives.py), NULL past the end. */
const char *qprobe_linfit_objective(int64_t code) {
    static const char *const names[OBJ_COUNT] = {"q", "ce", "pg", "bt", "dpo"};
    return code >= 0 && code < OBJ_COUNT ? names[code] : NULL;
}
