/* Few-row matmul (decode) for AVX2 + FMA + F16C CPUs, bound by how fast it reads the weights.
 *
 * Y[m, n] = sum_k X[m, k] * W[n, k] for m < M (M small), W bf16, fp16 or fp32 [N, K] row-major with
 * row stride ldw (elements), X and Y float32. Each weight element is widened to float32 in registers and
 * used for all M rows while it is in L1, so the weights are read from memory once; accumulation is float32.
 * Rows of W are split across OpenMP threads (the runtime torch already loaded, so no second pool).
 * Built and loaded by native.py; torch's own GEMV on such CPUs converts at about half this speed.
 */
#include <immintrin.h>
#include <stdint.h>

#define ROWS 4 /* weight rows per step: 4 x 2 accumulators keep the FMA pipes busy */
/* While a block streams in, the next block's rows are prefetched: the hardware prefetcher alone stops at
 * every 4 KiB page, and this measured +20-30% read bandwidth (2-core EPYC: 25-28 GB/s against 20-22). */

enum { BF16, FP16, FP32 }; /* the weight type; a compile-time constant in each exported function */

/* 8 weights starting at element i of w, as float32 */
static inline __attribute__((always_inline)) __m256 load8(const void *w, long i, const int kind) {
    if (kind == FP32)
        return _mm256_loadu_ps((const float *)w + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    if (kind == FP16)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); /* bf16 = high half */
}

static inline __attribute__((always_inline)) float load1(const void *w, long i, const int kind) {
    if (kind == FP32)
        return ((const float *)w)[i];
    uint16_t h = ((const uint16_t *)w)[i];
    if (kind == FP16)
        return _cvtsh_ss(h);
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

/* address of element i of w */
static inline __attribute__((always_inline)) const void *at(const void *w, long i, const int kind) {
    return (const char *)w + i * (kind == FP32 ? 4 : 2);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* dot products of `rows` (<= ROWS) consecutive weight rows with one float32 vector x */
static inline __attribute__((always_inline)) void dot_rows(const void *w, long ldw, long rows,
                                                           const float *x, long K, float *y, const int kind) {
    __m256 a[ROWS], b[ROWS];
    for (int r = 0; r < ROWS; r++)
        a[r] = b[r] = _mm256_setzero_ps();
    long k = 0;
    if (rows == ROWS) {
        for (; k + 16 <= K; k += 16) {
            __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
            for (int r = 0; r < ROWS; r++) {
                a[r] = _mm256_fmadd_ps(load8(w, r * ldw + k, kind), x0, a[r]);
                b[r] = _mm256_fmadd_ps(load8(w, r * ldw + k + 8, kind), x1, b[r]);
                _mm_prefetch(at(w, (r + ROWS) * ldw + k, kind), _MM_HINT_T0); /* never faults */
            }
        }
    }
    for (; k + 8 <= K; k += 8) {
        __m256 x0 = _mm256_loadu_ps(x + k);
        for (long r = 0; r < rows; r++)
            a[r] = _mm256_fmadd_ps(load8(w, r * ldw + k, kind), x0, a[r]);
    }
    for (long r = 0; r < rows; r++) {
        float s = hsum(_mm256_add_ps(a[r], b[r]));
        for (long j = k; j < K; j++)
            s += load1(w, r * ldw + j, kind) * x[j];
        y[r] = s;
    }
}

static inline __attribute__((always_inline)) void gemv(const void *W, long N, long K, long ldw,
                                                       const float *X, long M, long ldx, float *Y, long ldy,
                                                       int nthreads, const int kind) {
    long blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long i = 0; i < blocks; i++) {
        long n = i * ROWS, rows = N - n < ROWS ? N - n : ROWS;
        for (long m = 0; m < M; m++) /* later rows of X find this block of W still in L1 */
            dot_rows(at(W, n * ldw, kind), ldw, rows, X + m * ldx, K, Y + m * ldy + n, kind);
    }
}

void merger_gemv_bf16(const uint16_t *W, long N, long K, long ldw, const float *X, long M, long ldx,
                      float *Y, long ldy, int nthreads) {
    gemv(W, N, K, ldw, X, M, ldx, Y, ldy, nthreads, BF16);
}

void merger_gemv_fp16(const uint16_t *W, long N, long K, long ldw, const float *X, long M, long ldx,
                      float *Y, long ldy, int nthreads) {
    gemv(W, N, K, ldw, X, M, ldx, Y, ldy, nthreads, FP16);
}

void merger_gemv_fp32(const float *W, long N, long K, long ldw, const float *X, long M, long ldx,
                      float *Y, long ldy, int nthreads) {
    gemv(W, N, K, ldw, X, M, ldx, Y, ldy, nthreads, FP32);
}
