/* The engine's CPU kernels for AVX2 + FMA + F16C: matmuls over bf16, fp16 or fp32 weights with float32
 * math, RMSNorm, one-query attention, and the whole decode step. Built and loaded by native.py; work is split
 * across OpenMP threads (the runtime torch already loaded, so no second pool). Weights W are [N, K] row-major
 * with row stride ldw (elements).
 *
 * gemv: Y[m, n] = sum_k X[m, k] * W[n, k] (+ bias) for a few rows m (decode), bound by how fast W is read.
 *   Each weight element is widened to float32 in registers and used for all M rows while it is in L1; X
 *   and Y may be any of the three types, so a decode matmul is one call.
 * gemm: the same for many rows (prefill), bound by FMA throughput; X float32, Y any type. Weights are
 *   widened while packed into L2-sized blocks: no float32 copy of W.
 * attend: one query per head over a KV cache of any of the three types, read as stored.
 * step: one token of a batch-1 decode through every layer and the logits, in one call (see its section).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { BF16, FP16, FP32 }; /* element types; the weight type is a compile-time constant per exported function */

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

/* 8 float32 -> bf16 bits, rounded to nearest even as torch rounds (NaN -> 0x7fc0) */
static inline __m128i to_bf16x8(__m256 v) {
    __m256i u = _mm256_castps_si256(v), one = _mm256_set1_epi32(1);
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                     _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
    r = _mm256_srli_epi32(r, 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    /* 32-bit lanes to 16-bit: packus works within 128-bit halves, so reorder the 64-bit quarters */
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

/* 8 float32 values to element i of y, rounded to y's type */
static inline __attribute__((always_inline)) void store8(void *y, long i, __m256 v, const int kind) {
    if (kind == FP32)
        _mm256_storeu_ps((float *)y + i, v);
    else if (kind == FP16)
        _mm_storeu_si128((__m128i *)((uint16_t *)y + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    else
        _mm_storeu_si128((__m128i *)((uint16_t *)y + i), to_bf16x8(v));
}

/* one value, rounded to y's type through the same vector path */
static inline __attribute__((always_inline)) void store1(void *y, long i, float v, const int kind) {
    union { uint16_t h[8]; float f[8]; } t;
    store8(kind == FP32 ? (void *)t.f : (void *)t.h, 0, _mm256_set1_ps(v), kind);
    if (kind == FP32)
        ((float *)y)[i] = t.f[0];
    else
        ((uint16_t *)y)[i] = t.h[0];
}

/* --- gemv ---------------------------------------------------------------------------------------- */

#define ROWS 4 /* weight rows per step: 4 x 2 accumulators keep the FMA pipes busy */
/* While a block streams in, the next block's rows are prefetched: the hardware prefetcher alone stops at
 * every 4 KiB page, and this measured +20-30% read bandwidth (2-core EPYC: 25-28 GB/s against 20-22). */

/* where gemv's sums go: Y[m][n] (+ bias[n]), rounded to Y's type */
typedef struct {
    void *Y;
    long ldy;
    const float *bias;  /* NULL or float32 [N] */
    int out;            /* BF16, FP16 or FP32 */
} gemv_out;

static inline void put(const gemv_out *o, long m, long n, float v) {
    if (o->bias)
        v += o->bias[n];
    long i = m * o->ldy + n;
    if (o->out == FP32)
        store1(o->Y, i, v, FP32);
    else if (o->out == FP16)
        store1(o->Y, i, v, FP16);
    else
        store1(o->Y, i, v, BF16);
}

/* s[r] = dot product of weight row r (< rows <= ROWS) with the vector x, summed in float32. x is float32,
 * or with bf16 weights it may be bf16 itself (xk == BF16): then one 256-bit load holds 16 elements of a row
 * and the same 16 of x in the same pairs, widened by a shift (the even elements) and a mask (the odd ones),
 * so x takes half the L1 and no lane shuffles (2-core EPYC, K = 5632: 28-32 GB/s against 18-19 with float32 x,
 * which no longer stays in L1 beside the streaming rows; a plain read ran at 33-57). Two rows at a time
 * sharing x's widening ran faster from L3 but a third slower from memory: two streams 4 KiB apart.
 * Two ways to walk the rows: one after another (one sequential stream, which the hardware prefetcher
 * follows), or all ROWS side by side (each element of x loaded once for ROWS rows, the next ROWS rows
 * prefetched). */
static inline __attribute__((always_inline)) void pairs(const void *w, long i, __m256 *even, __m256 *odd) {
    __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}

static inline __attribute__((always_inline)) void dots_side(const void *w, long ldw, long rows, const void *xv,
                                                            long K, float *s, const int kind, const int xk) {
    const float *x = xv;
    __m256 a[ROWS], b[ROWS];
    for (int r = 0; r < ROWS; r++)
        a[r] = b[r] = _mm256_setzero_ps();
    long k = 0;
    if (rows == ROWS) {
        for (; k + 16 <= K; k += 16) {
            __m256 x0, x1;
            if (xk == BF16)
                pairs(xv, k, &x0, &x1);
            else
                x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
            for (int r = 0; r < ROWS; r++) {
                __m256 w0, w1;
                if (xk == BF16)
                    pairs(w, r * ldw + k, &w0, &w1);
                else
                    w0 = load8(w, r * ldw + k, kind), w1 = load8(w, r * ldw + k + 8, kind);
                a[r] = _mm256_fmadd_ps(w0, x0, a[r]);
                b[r] = _mm256_fmadd_ps(w1, x1, b[r]);
                _mm_prefetch(at(w, (r + ROWS) * ldw + k, kind), _MM_HINT_T0); /* never faults */
            }
        }
    }
    for (; xk == BF16 && k + 16 <= K; k += 16) {  /* a last block of fewer rows */
        __m256 x0, x1, w0, w1;
        pairs(xv, k, &x0, &x1);
        for (long r = 0; r < rows; r++) {
            pairs(w, r * ldw + k, &w0, &w1);
            a[r] = _mm256_fmadd_ps(w0, x0, a[r]);
            b[r] = _mm256_fmadd_ps(w1, x1, b[r]);
        }
    }
    for (; xk != BF16 && k + 8 <= K; k += 8) {
        __m256 x0 = _mm256_loadu_ps(x + k);
        for (long r = 0; r < rows; r++)
            a[r] = _mm256_fmadd_ps(load8(w, r * ldw + k, kind), x0, a[r]);
    }
    for (long r = 0; r < rows; r++) {
        s[r] = hsum(_mm256_add_ps(a[r], b[r]));
        for (long j = k; j < K; j++)
            s[r] += load1(w, r * ldw + j, kind) * load1(xv, j, xk);
    }
}

static inline __attribute__((always_inline)) void dots_seq(const void *w, long ldw, long rows, const void *xv,
                                                           long K, float *s, const int kind, const int xk) {
    const float *x = xv;
    for (long r = 0; r < rows; r++) {
        const void *row = at(w, r * ldw, kind);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        long k = 0;
        if (xk == BF16) {
            for (; k + 32 <= K; k += 32) {
                __m256 w0, w1, w2, w3, x0, x1, x2, x3;
                pairs(row, k, &w0, &w1);
                pairs(row, k + 16, &w2, &w3);
                pairs(xv, k, &x0, &x1);
                pairs(xv, k + 16, &x2, &x3);
                a0 = _mm256_fmadd_ps(w0, x0, a0);
                a1 = _mm256_fmadd_ps(w1, x1, a1);
                a2 = _mm256_fmadd_ps(w2, x2, a2);
                a3 = _mm256_fmadd_ps(w3, x3, a3);
            }
        } else {
            for (; k + 32 <= K; k += 32) {
                a0 = _mm256_fmadd_ps(load8(row, k, kind), _mm256_loadu_ps(x + k), a0);
                a1 = _mm256_fmadd_ps(load8(row, k + 8, kind), _mm256_loadu_ps(x + k + 8), a1);
                a2 = _mm256_fmadd_ps(load8(row, k + 16, kind), _mm256_loadu_ps(x + k + 16), a2);
                a3 = _mm256_fmadd_ps(load8(row, k + 24, kind), _mm256_loadu_ps(x + k + 24), a3);
            }
            for (; k + 8 <= K; k += 8)
                a0 = _mm256_fmadd_ps(load8(row, k, kind), _mm256_loadu_ps(x + k), a0);
        }
        s[r] = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        for (; k < K; k++)
            s[r] += load1(row, k, kind) * load1(xv, k, xk);
    }
}

/* Which is faster depends on the CPU and K (2-core EPYC, bf16 with float32 x: one after another 36-45 GB/s
 * against 23-35 for K <= 2048, 20-22 against 34-37 for K >= 5632), so calibrate.py measures it: rows of
 * K >= side_from go side by side. */
static inline __attribute__((always_inline)) void dots(const void *w, long ldw, long rows, const void *x, long K,
                                                       float *s, long side_from, const int kind, const int xk) {
    if (K >= side_from)
        dots_side(w, ldw, rows, x, K, s, kind, xk);
    else
        dots_seq(w, ldw, rows, x, K, s, kind, xk);
}

/* The type dots() takes x in for weights of `kind`: bf16 weights take bf16 x, the others float32 */
#define XK(kind) ((kind) == BF16 ? BF16 : FP32)

/* dot products of `rows` (<= ROWS) consecutive weight rows n.. with one vector x (row m), to Y */
static inline __attribute__((always_inline)) void dot_rows(const void *w, long ldw, long rows, const void *x,
                                                           long K, const gemv_out *o, long m, long n,
                                                           long side_from, const int kind, const int xk) {
    float s[ROWS];
    dots(w, ldw, rows, x, K, s, side_from, kind, xk);
    for (long r = 0; r < rows; r++)
        put(o, m, n + r, s[r]);
}

/* Y[m][n] = sum_k X[m][k] * W[n][k] (+ bias[n]) for a few rows m. X is bf16, fp16 or float32 (xkind): with
 * bf16 weights bf16 X is read as it is, any other X is widened once up front; the sums are float32, rounded
 * once into Y's type. 0, or 1 if out of memory. */
static inline __attribute__((always_inline)) int gemv(const void *W, long N, long K, long ldw, const void *X,
                                                      long M, long ldx, void *Y, long ldy, const float *bias,
                                                      int xkind, int out, long side_from, int nthreads,
                                                      const int kind) {
    float *x32 = NULL;
    int paired = kind == BF16 && xkind == BF16;
    if (xkind != FP32 && !paired) {
        x32 = malloc((M * K + 1) * sizeof(float));
        if (!x32)
            return 1;
        for (long m = 0; m < M; m++)
            for (long k = 0; k < K; k++)
                x32[m * K + k] = load1(X, m * ldx + k, xkind);
        X = x32;
        ldx = K;
    }
    gemv_out o = { Y, ldy, bias, out };
    long blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long i = 0; i < blocks; i++) {
        long n = i * ROWS, rows = N - n < ROWS ? N - n : ROWS;
        for (long m = 0; m < M; m++) { /* later rows of X find this block of W still in L1 */
            if (paired)
                dot_rows(at(W, n * ldw, kind), ldw, rows, at(X, m * ldx, BF16), K, &o, m, n, side_from, kind, BF16);
            else
                dot_rows(at(W, n * ldw, kind), ldw, rows, (const float *)X + m * ldx, K, &o, m, n, side_from, kind,
                         FP32);
        }
    }
    free(x32);
    return 0;
}

int merger_gemv_bf16(const uint16_t *W, long N, long K, long ldw, const void *X, long M, long ldx, void *Y,
                     long ldy, const float *bias, int xkind, int out, long side_from, int nthreads) {
    return gemv(W, N, K, ldw, X, M, ldx, Y, ldy, bias, xkind, out, side_from, nthreads, BF16);
}

int merger_gemv_fp16(const uint16_t *W, long N, long K, long ldw, const void *X, long M, long ldx, void *Y,
                     long ldy, const float *bias, int xkind, int out, long side_from, int nthreads) {
    return gemv(W, N, K, ldw, X, M, ldx, Y, ldy, bias, xkind, out, side_from, nthreads, FP16);
}

int merger_gemv_fp32(const float *W, long N, long K, long ldw, const void *X, long M, long ldx, void *Y,
                     long ldy, const float *bias, int xkind, int out, long side_from, int nthreads) {
    return gemv(W, N, K, ldw, X, M, ldx, Y, ldy, bias, xkind, out, side_from, nthreads, FP32);
}

/* --- gemm ---------------------------------------------------------------------------------------- */
/* Blocked like BLIS. Tokens go in chunks of up to CHUNK; each chunk's X is packed once, for every
 * KC-wide slice of K, into token groups Xp[q][g][k][MR] (L2/L3). Each thread takes a contiguous run of
 * NR-row weight strips and walks it MB strips at a time: for each slice it widens the block's weights
 * into float32 Wp[MB][NR][KC] (L2), then runs the NR x MR micro-tile over every token group and strip,
 * so a token group stays in L1 across the block's strips, and the block's partial sums (Cs, MB*NR rows x
 * the chunk's tokens) stay in L2 across slices. The last slice adds the bias and writes Y[m][n] directly,
 * rounded to Y's type: no transposing pass afterwards.
 * Measured on a 2-core EPYC (bench/kernels.py; FMA peak ~88 GFLOP/s per core, from a register-only loop):
 * 105-170 GFLOP/s on 2 threads for 64-512 tokens (the VM's speed varies from run to run; 170 is ~95% of
 * that peak), 1.1-1.5x torch's path. With the slices outside the strip loop, as before, the
 * MoE's 11264x2048 expert projection at 64 tokens ran 20-35% slower: its partial sums (2.9 MB) left L2 on
 * every slice. Blocks of 4-16 strips measured alike. */

#define KC 256     /* k per slice: a strip's Wp is 6 KiB, a token group's Xp 16 KiB */
#define NR 6       /* weight rows per micro-tile */
#define MR 16      /* tokens per micro-tile: two ymm; 6 x 2 accumulators + 3 operands = 15 of 16 registers */
#define MB 8       /* strips per block: Wp and Cs are 48 KiB each */
#define CHUNK 256  /* tokens per chunk: Xp is at most 1 KiB x K */

/* Wp[i][k] = W[n0 + i][p + k] as float32, zero rows from `rows` on */
static inline __attribute__((always_inline)) void pack_w(const void *W, long ldw, long n0, long rows, long p,
                                                         long kc, float *Wp, const int kind) {
    for (long i = 0; i < NR; i++) {
        float *dst = Wp + i * KC;
        if (i >= rows) {
            memset(dst, 0, kc * sizeof(float));
            continue;
        }
        long base = (n0 + i) * ldw + p, k = 0;
        for (; k + 8 <= kc; k += 8)
            _mm256_storeu_ps(dst + k, load8(W, base + k, kind));
        for (; k < kc; k++)
            dst[k] = load1(W, base + k, kind);
    }
}

/* Xp[k][m] = X[m][k] for m < rows, zero after, k < kc */
static inline void pack_x(const float *X, long ldx, long rows, long kc, float *Xp) {
    for (long m = 0; m < MR; m++) {
        float *dst = Xp + m;
        if (m < rows) {
            for (long k = 0; k < kc; k++)
                dst[k * MR] = X[m * ldx + k];
        } else {
            for (long k = 0; k < kc; k++)
                dst[k * MR] = 0.f;
        }
    }
}

/* where a micro-tile's sums go: partial sums Cs (row stride CHUNK) between slices, Y on the last one */
typedef struct {
    void *Y;
    long ldy, tokens;   /* valid tokens of this tile (<= MR) */
    const float *bias;  /* NULL or bias[n0..] */
    int out;            /* BF16, FP16 or FP32: Y's element type */
} tile_out;

/* Tile (NR weight rows x 8*halves tokens) of sum_k Wp[i][k] * Xp[k][m]; added to the partial sums in Cs
 * unless `first`; kept in Cs unless `last`, when it goes (+ bias) to Y[m][n0 + i], transposed, rounded. */
static inline __attribute__((always_inline)) void micro(const float *Wp, const float *Xp, long kc, float *Cs,
                                                        long rows, int first, int last, const tile_out *o,
                                                        const int halves) {
    __m256 c[NR][2];
    for (int i = 0; i < NR; i++)
        c[i][0] = c[i][1] = _mm256_setzero_ps();
    for (long k = 0; k < kc; k++) {
        __m256 b0 = _mm256_loadu_ps(Xp + k * MR), b1 = halves == 2 ? _mm256_loadu_ps(Xp + k * MR + 8) : b0;
        for (int i = 0; i < NR; i++) {
            __m256 a = _mm256_broadcast_ss(Wp + i * KC + k);
            c[i][0] = _mm256_fmadd_ps(a, b0, c[i][0]);
            if (halves == 2)
                c[i][1] = _mm256_fmadd_ps(a, b1, c[i][1]);
        }
    }
    /* the accumulators leave registers once, here, at constant indices: indexing c by a run-time row
     * count below made gcc keep c in memory inside the k loop (measured 2.3x slower) */
    union { float f[NR][MR]; uint16_t h[NR][MR]; } t __attribute__((aligned(32)));
    for (int i = 0; i < NR; i++)
        for (int h = 0; h < halves; h++)
            _mm256_store_ps(&t.f[i][8 * h], c[i][h]);
    for (long i = 0; i < rows; i++)
        for (int h = 0; h < halves; h++) {
            __m256 v = _mm256_load_ps(&t.f[i][8 * h]);
            if (!first)
                v = _mm256_add_ps(v, _mm256_loadu_ps(Cs + i * CHUNK + 8 * h));
            if (!last) {
                _mm256_storeu_ps(Cs + i * CHUNK + 8 * h, v);
                continue;
            }
            if (o->bias)  /* last slice: + bias, rounded 8 at a time, written transposed below */
                v = _mm256_add_ps(v, _mm256_set1_ps(o->bias[i]));
            if (o->out == FP32)
                _mm256_store_ps(&t.f[i][8 * h], v);
            else if (o->out == FP16)
                _mm_store_si128((__m128i *)&t.h[i][8 * h], _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
            else
                _mm_store_si128((__m128i *)&t.h[i][8 * h], to_bf16x8(v));
        }
    if (!last)
        return;
    if (o->out == FP32) {
        for (long m = 0; m < o->tokens; m++)
            for (long i = 0; i < rows; i++)
                ((float *)o->Y)[m * o->ldy + i] = t.f[i][m];
    } else {
        for (long m = 0; m < o->tokens; m++)
            for (long i = 0; i < rows; i++)
                ((uint16_t *)o->Y)[m * o->ldy + i] = t.h[i][m];
    }
}

/* Y[m][n] = sum_k X[m][k] * W[n][k] (+ bias[n]) in Y's type `out`. 0, or 1 if out of memory. */
static inline __attribute__((always_inline)) int gemm(const void *W, long N, long K, long ldw, const float *X,
                                                      long M, long ldx, void *Y, long ldy, const float *bias,
                                                      int out, int nthreads, const int kind) {
    long strips = (N + NR - 1) / NR, slices = (K + KC - 1) / KC;
    if (K == 0) {
        float t[NR][MR] = {{0}};
        for (long m0 = 0; m0 < M; m0 += MR)
            for (long n0 = 0; n0 < N; n0 += NR) {
                tile_out o = { (char *)Y + (m0 * ldy + n0) * (out == FP32 ? 4 : 2), ldy,
                               M - m0 < MR ? M - m0 : MR, bias ? bias + n0 : NULL, out };
                micro((const float *)t, (const float *)t, 0, NULL, N - n0 < NR ? N - n0 : NR, 1, 1, &o, 2);
            }
        return 0;
    }
    long chunk = M < CHUNK ? M : CHUNK, xp = slices * ((chunk + MR - 1) / MR) * KC * MR;
    long per_thread = MB * NR * KC + MB * NR * CHUNK;  /* Wp, Cs */
    float *buf = aligned_alloc(64, (xp + nthreads * per_thread) * sizeof(float));
    if (!buf)
        return 1;
    for (long m0 = 0; m0 < M; m0 += CHUNK) {
        long tokens = M - m0 < CHUNK ? M - m0 : CHUNK, groups = (tokens + MR - 1) / MR;
#pragma omp parallel num_threads(nthreads)
        {
#pragma omp for schedule(static) collapse(2)
            for (long q = 0; q < slices; q++)
                for (long g = 0; g < groups; g++) {
                    long p = q * KC, rows = tokens - g * MR;
                    pack_x(X + (m0 + g * MR) * ldx + p, ldx, rows < MR ? rows : MR, K - p < KC ? K - p : KC,
                           buf + (q * groups + g) * KC * MR);
                }
            int nt = omp_get_num_threads(), t = omp_get_thread_num();
            float *Wp = buf + xp + t * per_thread, *Cs = Wp + MB * NR * KC;
            long s0 = strips * t / nt, s1 = strips * (t + 1) / nt;
            for (long b = s0; b < s1; b += MB) {
                long nb = s1 - b < MB ? s1 - b : MB;
                for (long q = 0; q < slices; q++) {
                    long p = q * KC, kc = K - p < KC ? K - p : KC;
                    for (long s = 0; s < nb; s++) {
                        long n0 = (b + s) * NR, rows = N - n0 < NR ? N - n0 : NR;
                        pack_w(W, ldw, n0, rows, p, kc, Wp + s * NR * KC, kind);
                        /* what this strip packs next (its next slice, or the next block's first) is pulled
                         * toward L2 now: 6 short rows per strip defeat the hardware prefetcher */
                        long pn = p + KC, nn = n0;
                        if (pn >= K) {
                            pn = 0;
                            nn = n0 + nb * NR;
                        }
                        for (long i = 0; i < NR && nn + i < N; i++)
                            for (long k = 0; k < KC && pn + k < K; k += (kind == FP32 ? 16 : 32))
                                _mm_prefetch(at(W, (nn + i) * ldw + pn + k, kind), _MM_HINT_T1);
                    }
                    for (long g = 0; g < groups; g++) {
                        long valid = tokens - g * MR < MR ? tokens - g * MR : MR;
                        for (long s = 0; s < nb; s++) {
                            long n0 = (b + s) * NR, rows = N - n0 < NR ? N - n0 : NR;
                            tile_out o = { (char *)Y + ((m0 + g * MR) * ldy + n0) * (out == FP32 ? 4 : 2), ldy,
                                           valid, bias ? bias + n0 : NULL, out };
                            const float *wp = Wp + s * NR * KC, *x = buf + (q * groups + g) * KC * MR;
                            float *cs = Cs + s * NR * CHUNK + g * MR;
                            if (valid > 8)  /* a last group of <= 8 tokens runs half as wide */
                                micro(wp, x, kc, cs, rows, q == 0, q == slices - 1, &o, 2);
                            else
                                micro(wp, x, kc, cs, rows, q == 0, q == slices - 1, &o, 1);
                        }
                    }
                }
            }
        }
    }
    free(buf);
    return 0;
}

int merger_gemm_bf16(const uint16_t *W, long N, long K, long ldw, const float *X, long M, long ldx, void *Y,
                     long ldy, const float *bias, int out, int nthreads) {
    return gemm(W, N, K, ldw, X, M, ldx, Y, ldy, bias, out, nthreads, BF16);
}

int merger_gemm_fp16(const uint16_t *W, long N, long K, long ldw, const float *X, long M, long ldx, void *Y,
                     long ldy, const float *bias, int out, int nthreads) {
    return gemm(W, N, K, ldw, X, M, ldx, Y, ldy, bias, out, nthreads, FP16);
}

int merger_gemm_fp32(const float *W, long N, long K, long ldw, const float *X, long M, long ldx, void *Y,
                     long ldy, const float *bias, int out, int nthreads) {
    return gemm(W, N, K, ldw, X, M, ldx, Y, ldy, bias, out, nthreads, FP32);
}

/* --- decode helpers ------------------------------------------------------------------------------- */
/* Each replaces torch ops whose per-call cost dominates at decode sizes (2-core EPYC): the RMSNorm path
 * (upcast, rms_norm, round, scale) took ~60 us for one 2048-wide row; together with the attention kernel
 * this cut 0.4-0.7 ms of the 3.5-5 ms a decode step spends outside its matmuls. */

/* Y[r] = X[r] / sqrt(mean(X[r]^2) + eps) * w, in float32. In half precision the normalised row is rounded
 * to the type before w multiplies it, and the product rounded again: transformers' `weight * h.to(dtype)`. */
static inline __attribute__((always_inline)) void rmsnorm(const void *X, long rows, long dim, long ldx,
                                                          const void *w, float eps, void *Y, long ldy,
                                                          int nthreads, const int kind) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows >= 16)
    for (long r = 0; r < rows; r++) {
        const void *x = at(X, r * ldx, kind);
        void *y = (char *)Y + r * ldy * (kind == FP32 ? 4 : 2);
        __m256 a = _mm256_setzero_ps();
        long k = 0;
        for (; k + 8 <= dim; k += 8) {
            __m256 v = load8(x, k, kind);
            a = _mm256_fmadd_ps(v, v, a);
        }
        float ss = hsum(a);
        for (; k < dim; k++)
            ss += load1(x, k, kind) * load1(x, k, kind);
        float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        __m256 vinv = _mm256_set1_ps(inv);
        for (k = 0; k + 8 <= dim; k += 8) {
            __m256 h = _mm256_mul_ps(load8(x, k, kind), vinv);
            if (kind != FP32) {  /* round, widen back, then scale: two roundings, as transformers */
                store8(y, k, h, kind);
                h = load8(y, k, kind);
            }
            store8(y, k, _mm256_mul_ps(h, load8(w, k, kind)), kind);
        }
        for (; k < dim; k++) {
            float h = load1(x, k, kind) * inv;
            if (kind != FP32) {
                store1(y, k, h, kind);
                h = load1(y, k, kind);
            }
            store1(y, k, h * load1(w, k, kind), kind);
        }
    }
}

void merger_rmsnorm_bf16(const uint16_t *X, long rows, long dim, long ldx, const uint16_t *w, float eps,
                         uint16_t *Y, long ldy, int nthreads) {
    rmsnorm(X, rows, dim, ldx, w, eps, Y, ldy, nthreads, BF16);
}

void merger_rmsnorm_fp16(const uint16_t *X, long rows, long dim, long ldx, const uint16_t *w, float eps,
                         uint16_t *Y, long ldy, int nthreads) {
    rmsnorm(X, rows, dim, ldx, w, eps, Y, ldy, nthreads, FP16);
}

void merger_rmsnorm_fp32(const float *X, long rows, long dim, long ldx, const float *w, float eps,
                         float *Y, long ldy, int nthreads) {
    rmsnorm(X, rows, dim, ldx, w, eps, Y, ldy, nthreads, FP32);
}

/* exp of 8 float32 lanes, within 2 ulp of expf for |x| < 87 (inputs are clamped to [-87, 88]): 2^n * e^r
 * with n = round(x / ln 2), r = x - n ln 2 split in two parts, e^r by a degree-6 polynomial */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* --- one-query attention --------------------------------------------------------------------------- */
/* Keys and values are read in the cache's own type (bf16 / fp16 widened in registers, as the matmuls read
 * weights), so a half-precision model keeps a half-precision cache: half the bytes per key. Key ranges are
 * reduced to (max score, sum of exp, unnormalised weighted values), which merge exactly, so a range can be
 * split across threads (the decode step splits the keys; the per-call kernel the heads). */

#define KB 128 /* keys per block: a block's scores stay in L1 */

/* For GS (<= 4) query heads Q[g] sharing one key/value head, over keys s0..s1 of k / v (position stride ss,
 * cache type ck): M[g] = max score, L[g] = sum exp(score - M[g]), A[g][D] = sum exp(score - M[g]) v. The
 * scores are scale * (q . k), summed in float32. Each key and value row is read once for all GS heads. */
static inline __attribute__((always_inline)) void attend_part(const float *Q, long D, const void *k, const void *v,
                                                              long ss, long s0, long s1, float scale, float *M,
                                                              float *L, float *A, const int GS, const int ck) {
    float P[4][KB];
    for (int g = 0; g < GS; g++) {
        M[g] = -INFINITY;
        L[g] = 0.f;
        memset(A + g * D, 0, D * sizeof(float));
    }
    for (long b0 = s0; b0 < s1; b0 += KB) {
        long n = s1 - b0 < KB ? s1 - b0 : KB;
        for (long s = 0; s < n; s++) {
            const void *ks = at(k, (b0 + s) * ss, ck);
            __m256 acc[4];
            for (int g = 0; g < GS; g++)
                acc[g] = _mm256_setzero_ps();
            long d = 0;
            for (; d + 8 <= D; d += 8) {
                __m256 kv = load8(ks, d, ck);
                for (int g = 0; g < GS; g++)
                    acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(Q + g * D + d), kv, acc[g]);
            }
            for (int g = 0; g < GS; g++) {
                float r = hsum(acc[g]);
                for (long e = d; e < D; e++)  /* a head size that is not a multiple of 8 */
                    r += Q[g * D + e] * load1(ks, e, ck);
                P[g][s] = r * scale;
            }
        }
        for (int g = 0; g < GS; g++) {  /* the running maximum moves: rescale what was summed so far */
            float bm = M[g];
            for (long s = 0; s < n; s++)
                bm = P[g][s] > bm ? P[g][s] : bm;
            float c = expf(M[g] - bm), sum = 0.f;
            long s = 0;
            __m256 vm = _mm256_set1_ps(bm), vs = _mm256_setzero_ps();
            for (; s + 8 <= n; s += 8) {
                __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(P[g] + s), vm));
                _mm256_storeu_ps(P[g] + s, e);
                vs = _mm256_add_ps(vs, e);
            }
            sum = hsum(vs);
            for (; s < n; s++)
                sum += (P[g][s] = expf(P[g][s] - bm));
            L[g] = L[g] * c + sum;
            M[g] = bm;
            if (c != 1.f)
                for (long d = 0; d < D; d++)
                    A[g * D + d] *= c;
        }
        long d = 0;
        for (; d + 16 <= D; d += 16) {
            __m256 acc[4][2];
            for (int g = 0; g < GS; g++) {
                acc[g][0] = _mm256_loadu_ps(A + g * D + d);
                acc[g][1] = _mm256_loadu_ps(A + g * D + d + 8);
            }
            for (long s = 0; s < n; s++) {
                const void *vs = at(v, (b0 + s) * ss, ck);
                __m256 v0 = load8(vs, d, ck), v1 = load8(vs, d + 8, ck);
                for (int g = 0; g < GS; g++) {
                    __m256 w = _mm256_broadcast_ss(P[g] + s);
                    acc[g][0] = _mm256_fmadd_ps(w, v0, acc[g][0]);
                    acc[g][1] = _mm256_fmadd_ps(w, v1, acc[g][1]);
                }
            }
            for (int g = 0; g < GS; g++) {
                _mm256_storeu_ps(A + g * D + d, acc[g][0]);
                _mm256_storeu_ps(A + g * D + d + 8, acc[g][1]);
            }
        }
        for (; d < D; d++)
            for (int g = 0; g < GS; g++)
                for (long s = 0; s < n; s++)
                    A[g * D + d] += P[g][s] * load1(v, (b0 + s) * ss + d, ck);
    }
}

/* the GS-head part over s0..s1, the head count fixed at compile time so the accumulators stay in registers */
static inline __attribute__((always_inline)) void attend_heads(const float *Q, long D, const void *k, const void *v,
                                                               long ss, long s0, long s1, float scale, float *M,
                                                               float *L, float *A, long GS, const int ck) {
    switch (GS) {
    case 4: attend_part(Q, D, k, v, ss, s0, s1, scale, M, L, A, 4, ck); break;
    case 3: attend_part(Q, D, k, v, ss, s0, s1, scale, M, L, A, 3, ck); break;
    case 2: attend_part(Q, D, k, v, ss, s0, s1, scale, M, L, A, 2, ck); break;
    default: attend_part(Q, D, k, v, ss, s0, s1, scale, M, L, A, 1, ck); break;
    }
}

/* One query per head over S cached keys: Q, O [B, H, D] float32 contiguous; K, V [B, KV, S, D] in the cache
 * type with the given batch / head / position strides (the cache's views); query head h reads key/value head
 * h / (H / KV). O = softmax(scale * Q K^T) V; the query heads of a key/value head go in fours, so each K and
 * V row is read once per four heads; threads split (batch, key/value head, four). 0, or 1 if out of memory.
 * Measured against SDPA over a float32 cache (16 or 32 heads, a quarter as many KV heads, 128 wide): 1.2-1.9x
 * as fast at 200 keys, 2.2-3.8x at 1000-8000. */
static inline __attribute__((always_inline)) int attend(const float *Q, long B, long H, long D, const void *K,
                                                        const void *V, long KV, long S, long sb, long sh, long ss,
                                                        float scale, float *O, int nthreads, const int ck) {
    long G = H / KV, chunks = (G + 3) / 4;
    float *ml = malloc((size_t)B * H * 2 * sizeof(float));
    if (!ml)
        return 1;
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(3) if (S * H >= 4096)
    for (long b = 0; b < B; b++)
        for (long kv = 0; kv < KV; kv++)
            for (long c = 0; c < chunks; c++) {
                long h = kv * G + 4 * c, n = G - 4 * c < 4 ? G - 4 * c : 4;
                float *M = ml + 2 * (b * H + h), *L = M + n, *o = O + (b * H + h) * D;
                attend_heads(Q + (b * H + h) * D, D, at(K, b * sb + kv * sh, ck), at(V, b * sb + kv * sh, ck), ss,
                             0, S, scale, M, L, o, n, ck);
                for (long g = 0; g < n; g++)
                    for (long d = 0; d < D; d++)
                        o[g * D + d] /= L[g];
            }
    free(ml);
    return 0;
}

int merger_attend_bf16(const float *Q, long B, long H, long D, const uint16_t *K, const uint16_t *V, long KV,
                       long S, long sb, long sh, long ss, float scale, float *O, int nthreads) {
    return attend(Q, B, H, D, K, V, KV, S, sb, sh, ss, scale, O, nthreads, BF16);
}

int merger_attend_fp16(const float *Q, long B, long H, long D, const uint16_t *K, const uint16_t *V, long KV,
                       long S, long sb, long sh, long ss, float scale, float *O, int nthreads) {
    return attend(Q, B, H, D, K, V, KV, S, sb, sh, ss, scale, O, nthreads, FP16);
}

int merger_attend_fp32(const float *Q, long B, long H, long D, const float *K, const float *V, long KV, long S,
                       long sb, long sh, long ss, float scale, float *O, int nthreads) {
    return attend(Q, B, H, D, K, V, KV, S, sb, sh, ss, scale, O, nthreads, FP32);
}

/* --- the decode step ------------------------------------------------------------------------------ */
/* One token of a batch-1 decode, every layer and the logits, in one call and one parallel region: the
 * per-layer tables below are built once per KV cache (step.py) and replayed for each token, as llama.cpp
 * replays its graph. Torch's per-op cost (5-40 us a call, a dozen calls a layer) and the thread pool's
 * start per op are gone; the threads meet at 5 barriers a layer, one after each matmul. Each thread keeps
 * its own copy of the residual stream and the normed vector and does the vector-sized work itself, so only
 * the matmul outputs and the attention partials are shared. Rounding follows the per-op path (and so
 * transformers): every tensor the model would hold in its dtype is rounded to it where the op ends. */

typedef struct {
    const void *wqkv, *wo, *w13, *w2, *router;       /* router NULL: a dense MLP; else [E, D] experts */
    const float *bqkv, *bo, *b13, *b2;               /* float32 biases or NULL */
    const void *attn_norm, *ffn_norm, *q_norm, *k_norm; /* q/k norms [Dh] or NULL */
    void *k, *v;                                     /* the layer's cache [KV, max_len, Dh], model type */
    long ffn;                                        /* the MLP's (or each expert's) hidden width F */
    long window;                                     /* > 0: only the last `window` keys */
} step_layer;

typedef struct {
    long dim, heads, kv_heads, head_dim, experts, top_k, layers, vocab, max_len;
    long ffn_buf;                                    /* max over layers of F x (experts ? top_k : 1) */
    long side_from;                                  /* dots(): rows of K >= this side by side */
    int normalize;                                   /* renormalise the top-k routing weights */
    float eps, scale;                                /* RMSNorm epsilon; attention score scale */
    const void *embed, *norm, *output;               /* [V, D], [D], [V, D] */
    const step_layer *layer;
} step_model;

/* v rounded to the model type and widened back: where the per-op path holds a tensor in that type */
static inline __attribute__((always_inline)) float rnd(float v, const int kind) {
    if (kind == FP32)
        return v;
    if (kind == FP16)
        return _cvtsh_ss(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT));
    union { float f; uint32_t u; } b = { v };
    b.u = v != v ? 0x7fc00000u : (b.u + 0x7fffu + ((b.u >> 16) & 1u)) & 0xffff0000u;
    return b.f;
}

static inline __attribute__((always_inline)) __m256 rnd8(__m256 v, const int kind) {
    if (kind == FP32)
        return v;
    if (kind == FP16)
        return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(to_bf16x8(v)), 16));
}

/* y = x + a, rounded (the residual add), n elements */
static inline __attribute__((always_inline)) void add_rows(float *x, const float *a, long n, const int kind) {
    long i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, rnd8(_mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(a + i)), kind));
    for (; i < n; i++)
        x[i] = rnd(x[i] + a[i], kind);
}

/* the RMSNorm kernel's math on a float32 row that holds model-type values */
static inline __attribute__((always_inline)) void norm_row(const float *x, const void *w, long dim, float eps,
                                                           float *y, const int kind) {
    __m256 a = _mm256_setzero_ps();
    long k = 0;
    for (; k + 8 <= dim; k += 8) {
        __m256 v = _mm256_loadu_ps(x + k);
        a = _mm256_fmadd_ps(v, v, a);
    }
    float ss = hsum(a);
    for (; k < dim; k++)
        ss += x[k] * x[k];
    float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    for (k = 0; k + 8 <= dim; k += 8) {
        __m256 h = rnd8(_mm256_mul_ps(_mm256_loadu_ps(x + k), _mm256_set1_ps(inv)), kind);
        _mm256_storeu_ps(y + k, rnd8(_mm256_mul_ps(h, load8(w, k, kind)), kind));
    }
    for (; k < dim; k++)
        y[k] = rnd(rnd(x[k] * inv, kind) * load1(w, k, kind), kind);
}

/* rotate-half RoPE of one head x [D] -> y, as x * cos + cat(x2, x1) * folded sin in the model type */
static inline __attribute__((always_inline)) void rope_head(const float *x, const float *cos, const float *sin,
                                                            long D, float *y, const int kind) {
    long half = D / 2;
    for (long i = 0; i < D; i++) {
        float c = rnd(cos[i], kind), s = rnd(sin[i], kind), r = x[i < half ? i + half : i - half];
        y[i] = rnd(rnd(x[i] * c, kind) + rnd(r * s, kind), kind);
    }
}

/* silu(g) * u for 8 lanes, each product rounded where torch rounds: silu's output, then the product */
static inline __attribute__((always_inline)) __m256 swiglu8(__m256 g, __m256 u, const int kind) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    __m256 act = rnd8(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), kind);
    return rnd8(_mm256_mul_ps(act, u), kind);
}

/* How a matvec's rows are shared: guided (a thread takes half of what is left, then less, down to about
 * STEP_CHUNK_BYTES of weights), so each thread streams long runs, yet one slowed by another process leaves
 * what it has not started to the other. Measured on SmolLM2-135M (2-core EPYC, alternating runs): dynamic
 * runs of 16 rows 70 tok/s (bf16) and 48 (its MoE); 128 rows 100 / 68; guided down to 32 KiB 96 / 87, and
 * float32 57 -> 82. */
#ifndef STEP_CHUNK_BYTES
#define STEP_CHUNK_BYTES (32 << 10)
#endif
static inline long chunk_blocks(long K, const int kind) {  /* in ROWS-row blocks */
    long c = STEP_CHUNK_BYTES / (ROWS * K * (kind == FP32 ? 4 : 2) + 1);
    return c > 0 ? c : 1;
}

/* the matvec operand of x [n] for weights of `kind` (dots' XK): x itself, or its bf16 copy in xb (exact: x
 * holds values the per-op path holds in bf16) */
static inline __attribute__((always_inline)) const void *operand(const float *x, long n, uint16_t *xb,
                                                                 const int kind) {
    if (XK(kind) != BF16)
        return x;
    long i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(xb + i), to_bf16x8(_mm256_loadu_ps(x + i)));
    for (; i < n; i++)
        store1(xb, i, x[i], BF16);
    return xb;
}

/* out[n] = rnd(W[n] . x + bias[n]) for n < N (W contiguous [N, K], x an operand()); shared work, ends at a
 * barrier */
static inline __attribute__((always_inline)) void step_matvec(const void *W, long N, long K, const void *x,
                                                              const float *bias, float *out, int round,
                                                              long side_from, const int kind) {
    long blocks = (N + ROWS - 1) / ROWS, chunk = chunk_blocks(K, kind);
#pragma omp for schedule(guided, chunk)
    for (long i = 0; i < blocks; i++) {
        long n = i * ROWS, rows = N - n < ROWS ? N - n : ROWS;
        float s[ROWS];
        dots(at(W, n * K, kind), K, rows, x, K, s, side_from, kind, XK(kind));
        for (long r = 0; r < rows; r++) {
            float v = s[r] + (bias ? bias[n + r] : 0.f);
            out[n + r] = round ? rnd(v, kind) : v;
        }
    }
}

/* p[i] = silu(gate_i) * up_i with gate_i = W13[i] . x, up_i = W13[F + i] . x (+ biases): the gated MLP's
 * first half, gate and up rows read side by side, for `experts` stacked weights (W13 + j * 2FK, x an operand()
 * shared, p + j * F written as an operand); shared work, ends at a barrier */
static inline __attribute__((always_inline)) void step_gate_up(const void *const *W13, long n_w, long F, long K,
                                                               const void *x, const float *b13, void *p,
                                                               long side_from, const int kind) {
    long per = (F + 7) / 8, chunk = (chunk_blocks(K, kind) + 3) / 4;  /* an item: 2 x 8 rows */
#pragma omp for schedule(guided, chunk)
    for (long it = 0; it < n_w * per; it++) {
        long j = it / per, i0 = (it % per) * 8, rows = F - i0 < 8 ? F - i0 : 8;
        float g[8] = {0}, u[8] = {0}, out[8];
        for (long h = 0; h < rows; h += ROWS) {
            long r = rows - h < ROWS ? rows - h : ROWS;
            dots(at(W13[j], (i0 + h) * K, kind), K, r, x, K, g + h, side_from, kind, XK(kind));
            dots(at(W13[j], (F + i0 + h) * K, kind), K, r, x, K, u + h, side_from, kind, XK(kind));
        }
        for (long r = 0; r < 8; r++) {
            g[r] = rnd(g[r] + (b13 && r < rows ? b13[i0 + r] : 0.f), kind);
            u[r] = rnd(u[r] + (b13 && r < rows ? b13[F + i0 + r] : 0.f), kind);
        }
        __m256 y = swiglu8(_mm256_loadu_ps(g), _mm256_loadu_ps(u), kind);
        if (XK(kind) == BF16) {
            uint16_t h[8];
            _mm_storeu_si128((__m128i *)h, to_bf16x8(y));  /* exact: swiglu8 rounded to bf16 */
            memcpy((uint16_t *)p + j * F + i0, h, rows * sizeof(uint16_t));
        } else {
            _mm256_storeu_ps(out, y);
            memcpy((float *)p + j * F + i0, out, rows * sizeof(float));
        }
    }
}

/* a[n] = rnd(sum_j rnd(W2_j[n] . p_j) * wt_j) over the chosen experts in order (the per-op path's float32
 * accumulation), or rnd(W2[n] . p + b2[n]) for a dense MLP (p: the operands gate_up wrote); shared work, ends
 * at a barrier. Each expert's rows are one pass with its own p_j (ex[j][n] holds the rounded sums), so p_j
 * stays in L1 rather than alternating with the other experts' inputs row by row. */
static inline __attribute__((always_inline)) void step_down(const void *const *W2, long n_w, long D, long F,
                                                            const void *p, const float *wt, const float *b2,
                                                            float *a, float *ex, long side_from, const int kind) {
    long blocks = (D + ROWS - 1) / ROWS, chunk = chunk_blocks(F, kind);
#pragma omp for schedule(guided, chunk)
    for (long it = 0; it < n_w * blocks; it++) {
        long j = it / blocks, n = (it % blocks) * ROWS, rows = D - n < ROWS ? D - n : ROWS;
        float s[ROWS];
        dots(at(W2[j], n * F, kind), F, rows, at(p, j * F, XK(kind)), F, s, side_from, kind, XK(kind));
        for (long r = 0; r < rows; r++) {
            if (wt)
                ex[j * D + n + r] = rnd(s[r], kind);
            else
                a[n + r] = rnd(s[r] + (b2 ? b2[n + r] : 0.f), kind);
        }
    }
    if (!wt)
        return;
#pragma omp for schedule(static)
    for (long n = 0; n < D; n++) {
        float acc = 0.f;
        for (long j = 0; j < n_w; j++)
            acc += ex[j * D + n] * wt[j];
        a[n] = rnd(acc, kind);
    }
}

/* softmax over the E router logits of x (float32), top-k (ties to the lower index), renormalised if asked */
static void route_token(const float *x, const void *router, long E, long D, long k, int normalize, float *wt,
                        long *ids, const int kind) {
    float logit[64], mx = -INFINITY, sum = 0.f;
    for (long e = 0; e < E; e++) {
        float s = 0.f;
        for (long d = 0; d < D; d++)
            s += x[d] * load1(router, e * D + d, kind);
        logit[e] = s;
        mx = s > mx ? s : mx;
    }
    for (long e = 0; e < E; e++)
        sum += (logit[e] = expf(logit[e] - mx));
    for (long e = 0; e < E; e++)
        logit[e] /= sum;
    float total = 0.f;
    for (long j = 0; j < k; j++) {
        long best = -1;
        for (long e = 0; e < E; e++)
            if (logit[e] >= 0.f && (best < 0 || logit[e] > logit[best]))
                best = e;
        ids[j] = best;
        wt[j] = logit[best];
        total += wt[j];
        logit[best] = -1.f;
    }
    if (normalize)
        for (long j = 0; j < k; j++)
            wt[j] /= total;
}

/* The logits [V] (float32) of `token` at position `pos`, its keys and values written into the cache;
 * cos / sin are the RoPE table's float32 rows for pos (sin sign-folded). 0, 1 if out of memory. */
static inline __attribute__((always_inline)) int step(const step_model *m, long token, long pos, const float *cos,
                                                      const float *sin, float *logits, int nthreads,
                                                      const int kind) {
    long D = m->dim, H = m->heads, KV = m->kv_heads, Dh = m->head_dim, G = H / KV;
    long qkv_n = (H + 2 * KV) * Dh, k_top = m->experts ? m->top_k : 1, sf = m->side_from;
    long shared = qkv_n + D + m->ffn_buf + k_top * D + nthreads * H * (Dh + 2);
    long priv = 2 * D + 2 * H * Dh + 2 * KV * Dh + 2 * k_top + (D + H * Dh) / 2 + 1;
    float *buf = malloc((shared + nthreads * priv) * sizeof(float));
    if (!buf)
        return 1;
    float *qkv = buf, *a = qkv + qkv_n, *p = a + D, *ex = p + m->ffn_buf, *part = ex + k_top * D;
#pragma omp parallel num_threads(nthreads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        float *x = buf + shared + t * priv, *hn = x + D, *q = hn + D, *o = q + H * Dh, *kr = o + H * Dh;
        float *kn = kr + KV * Dh, *wt = kn + KV * Dh;
        uint16_t *xb = (uint16_t *)(wt + 2 * k_top);  /* the bf16 operand of hn or o, D + H * Dh halves */
        long ids[64];
        for (long i = 0; i < D; i++)
            x[i] = load1(m->embed, token * D + i, kind);
        for (long l = 0; l < m->layers; l++) {
            const step_layer *ly = m->layer + l;
            long F = ly->ffn;
            norm_row(x, ly->attn_norm, D, m->eps, hn, kind);
            step_matvec(ly->wqkv, qkv_n, D, operand(hn, D, xb, kind), ly->bqkv, qkv, 1, sf, kind);
            /* every thread ropes all query heads; keys are split into one range per thread */
            for (long h = 0; h < H; h++) {
                const float *src = qkv + h * Dh;
                if (ly->q_norm) {
                    norm_row(src, ly->q_norm, Dh, m->eps, o, kind);
                    src = o;
                }
                rope_head(src, cos, sin, Dh, q + h * Dh, kind);
            }
            long S = pos + 1, lo = ly->window > 0 && S > ly->window ? S - ly->window : 0;
            long s0 = lo + (S - lo) * t / nt, s1 = lo + (S - lo) * (t + 1) / nt;
            if (t == nt - 1) { /* the range holding pos: its thread writes this token's key and value first */
                for (long g = 0; g < KV; g++) {
                    const float *src = qkv + (H + g) * Dh;
                    if (ly->k_norm) {
                        norm_row(src, ly->k_norm, Dh, m->eps, kn + g * Dh, kind);
                        src = kn + g * Dh;
                    }
                    rope_head(src, cos, sin, Dh, kr + g * Dh, kind);
                    for (long d = 0; d < Dh; d++) {
                        long c = (g * m->max_len + pos) * Dh + d;
                        store1(ly->k, c, kr[g * Dh + d], kind);
                        store1(ly->v, c, qkv[(H + KV + g) * Dh + d], kind);
                    }
                }
            }
            float *mine = part + t * H * (Dh + 2);  /* [H] max, [H] sum, [H][Dh] weighted values */
            for (long g = 0; g < KV; g++)
                for (long c = 0; c < G; c += 4) {
                    long h = g * G + c, n = G - c < 4 ? G - c : 4;
                    attend_heads(q + h * Dh, Dh, at(ly->k, g * m->max_len * Dh, kind),
                                 at(ly->v, g * m->max_len * Dh, kind), Dh, s0, s1, m->scale, mine + h,
                                 mine + H + h, mine + 2 * H + h * Dh, n, kind);
                }
#pragma omp barrier
            for (long h = 0; h < H; h++) {  /* merge the ranges, in thread order */
                float mx = -INFINITY, den = 0.f;
                for (int u = 0; u < nt; u++) {
                    float mu = part[u * H * (Dh + 2) + h];
                    mx = mu > mx ? mu : mx;
                }
                for (long d = 0; d < Dh; d++)
                    o[h * Dh + d] = 0.f;
                for (int u = 0; u < nt; u++) {
                    const float *pu = part + u * H * (Dh + 2);
                    if (pu[H + h] == 0.f)
                        continue;  /* an empty range */
                    float c = expf(pu[h] - mx);
                    den += pu[H + h] * c;
                    for (long d = 0; d < Dh; d++)
                        o[h * Dh + d] += pu[2 * H + h * Dh + d] * c;
                }
                for (long d = 0; d < Dh; d++)
                    o[h * Dh + d] = rnd(o[h * Dh + d] / den, kind);
            }
            step_matvec(ly->wo, D, H * Dh, operand(o, H * Dh, xb, kind), ly->bo, a, 1, sf, kind);
            add_rows(x, a, D, kind);
            norm_row(x, ly->ffn_norm, D, m->eps, hn, kind);
            const void *hx = operand(hn, D, xb, kind), *w13[64], *w2[64];
            if (!ly->router) {
                w13[0] = ly->w13;
                w2[0] = ly->w2;
                step_gate_up(w13, 1, F, D, hx, ly->b13, p, sf, kind);
                step_down(w2, 1, D, F, p, NULL, ly->b2, a, ex, sf, kind);
            } else {
                route_token(hn, ly->router, m->experts, D, k_top, m->normalize, wt, ids, kind);
                for (long j = 0; j < k_top; j++) {
                    w13[j] = at(ly->w13, ids[j] * 2 * F * D, kind);
                    w2[j] = at(ly->w2, ids[j] * D * F, kind);
                }
                step_gate_up(w13, k_top, F, D, hx, NULL, p, sf, kind);
                step_down(w2, k_top, D, F, p, wt, NULL, a, ex, sf, kind);
            }
            add_rows(x, a, D, kind);
        }
        norm_row(x, m->norm, D, m->eps, hn, kind);
        step_matvec(m->output, m->vocab, D, operand(hn, D, xb, kind), NULL, logits, 0, sf, kind);
    }
    free(buf);
    return 0;
}

int merger_step_bf16(const step_model *m, long token, long pos, const float *cos, const float *sin, float *logits,
                     int nthreads) {
    return step(m, token, pos, cos, sin, logits, nthreads, BF16);
}

int merger_step_fp16(const step_model *m, long token, long pos, const float *cos, const float *sin, float *logits,
                     int nthreads) {
    return step(m, token, pos, cos, sin, logits, nthreads, FP16);
}

int merger_step_fp32(const step_model *m, long token, long pos, const float *cos, const float *sin, float *logits,
                     int nthreads) {
    return step(m, token, pos, cos, sin, logits, nthreads, FP32);
}
