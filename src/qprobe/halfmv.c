/* Matrix-vector products on float16 rows with float32 arithmetic, for the probe trainer.
 *
 * A linear probe's training step reads each batch of standardised features twice: scores
 * s = X w, then the weight gradient X^T g. On a CPU this is bound by memory traffic. torch has
 * no fast float16 kernel for the second product, and upcasting each block to a float32 buffer
 * doubles what moves through the caches. These two loops read the float16 rows directly
 * (F16C converts 8 values per instruction) and accumulate in float32 with FMA.
 *
 * Built on first use by qprobe/halfmv.py with the system C compiler; the functions carry their
 * own target attribute, so the library loads on any x86-64 CPU and halfmv.py only calls them
 * after qprobe_halfmv_supported() says the CPU has AVX2, FMA and F16C. The summation order is
 * fixed by the code (4 row-wise partial sums of 8 lanes), so results are reproducible.
 */
#include <immintrin.h>
#include <stdint.h>

#define TARGET __attribute__((target("avx2,fma,f16c")))

int qprobe_halfmv_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}

TARGET static inline __m256 load8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

TARGET static inline float half_to_float(uint16_t h) {
    return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}

/* out[i] = bias[0] + sum_d x[i, d] w[d] for i < rows; x row-major [rows, dim] float16. */
TARGET void qprobe_dot_rows(const uint16_t *x, int64_t rows, int64_t dim, const float *w,
                            const float *bias, float *out) {
    const int64_t d32 = dim - dim % 32, d8 = dim - dim % 8;
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *r = x + i * dim;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        int64_t d = 0;
        for (; d < d32; d += 32) {
            a0 = _mm256_fmadd_ps(load8(r + d), _mm256_loadu_ps(w + d), a0);
            a1 = _mm256_fmadd_ps(load8(r + d + 8), _mm256_loadu_ps(w + d + 8), a1);
            a2 = _mm256_fmadd_ps(load8(r + d + 16), _mm256_loadu_ps(w + d + 16), a2);
            a3 = _mm256_fmadd_ps(load8(r + d + 24), _mm256_loadu_ps(w + d + 24), a3);
        }
        for (; d < d8; d += 8) a0 = _mm256_fmadd_ps(load8(r + d), _mm256_loadu_ps(w + d), a0);
        __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        float s = _mm_cvtss_f32(h);
        for (; d < dim; d++) s += half_to_float(r[d]) * w[d];
        out[i] = bias[0] + s;
    }
}

/* acc[d] += sum_i g[i] x[i, d] for d < dim; rows four at a time (one pass over acc per four). */
TARGET void qprobe_add_rows(const uint16_t *x, int64_t rows, int64_t dim, const float *g,
                            float *acc) {
    const int64_t d8 = dim - dim % 8;
    int64_t i = 0;
    for (; i + 4 <= rows; i += 4) {
        const uint16_t *r0 = x + i * dim, *r1 = r0 + dim, *r2 = r1 + dim, *r3 = r2 + dim;
        const __m256 g0 = _mm256_set1_ps(g[i]), g1 = _mm256_set1_ps(g[i + 1]);
        const __m256 g2 = _mm256_set1_ps(g[i + 2]), g3 = _mm256_set1_ps(g[i + 3]);
        int64_t d = 0;
        for (; d < d8; d += 8) {
            __m256 s = _mm256_mul_ps(g0, load8(r0 + d));
            s = _mm256_fmadd_ps(g1, load8(r1 + d), s);
            s = _mm256_fmadd_ps(g2, load8(r2 + d), s);
            s = _mm256_fmadd_ps(g3, load8(r3 + d), s);
            _mm256_storeu_ps(acc + d, _mm256_add_ps(_mm256_loadu_ps(acc + d), s));
        }
        for (; d < dim; d++)
            acc[d] += g[i] * half_to_float(r0[d]) + g[i + 1] * half_to_float(r1[d]) +
                      g[i + 2] * half_to_float(r2[d]) + g[i + 3] * half_to_float(r3[d]);
    }
    for (; i < rows; i++) {
        const uint16_t *r = x + i * dim;
        const __m256 gi = _mm256_set1_ps(g[i]);
        int64_t d = 0;
        for (; d < d8; d += 8)
            _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(gi, load8(r + d), _mm256_loadu_ps(acc + d)));
        for (; d < dim; d++) acc[d] += g[i] * half_to_float(r[d]);
    }
}
