/* The engine's CPU kernels for AVX2 + FMA + F16C: matmuls over bf16, fp16 or fp32 weights with float32
 * math, and RMSNorm and one-query attention for decode. Built and loaded by native.py; work is split across
 * OpenMP threads (the runtime torch already loaded, so no second pool). Weights W are [N, K] row-major with
 * row stride ldw (elements).
 *
 * gemv: Y[m, n] = sum_k X[m, k] * W[n, k] (+ bias) for a few rows m (decode), bound by how fast W is read.
 *   Each weight element is widened to float32 in registers and used for all M rows while it is in L1; X
 *   and Y may be any of the three types, so a decode matmul is one call.
 * gemm: the same for many rows (prefill), bound by FMA throughput; X float32, Y any type. Weights are
 *   widened while packed into L2-sized blocks: no float32 copy of W.
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

/* dot products of `rows` (<= ROWS) consecutive weight rows n.. with one float32 vector x (row m) */
static inline __attribute__((always_inline)) void dot_rows(const void *w, long ldw, long rows, const float *x,
                                                           long K, const gemv_out *o, long m, long n,
                                                           const int kind) {
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
        put(o, m, n + r, s);
    }
}

/* Y[m][n] = sum_k X[m][k] * W[n][k] (+ bias[n]) for a few rows m. X is bf16, fp16 or float32 (xkind) and
 * widened once up front; the sums are float32, rounded once into Y's type. 0, or 1 if out of memory. */
static inline __attribute__((always_inline)) int gemv(const void *W, long N, long K, long ldw, const void *X,
                                                      long M, long ldx, void *Y, long ldy, const float *bias,
                                                      int xkind, int out, int nthreads, const int kind) {
    float *x32 = NULL;
    const float *x = X;
    if (xkind != FP32) {
        x32 = malloc((M * K + 1) * sizeof(float));
        if (!x32)
            return 1;
        for (long m = 0; m < M; m++)
            for (long k = 0; k < K; k++)
                x32[m * K + k] = load1(X, m * ldx + k, xkind);
        x = x32;
        ldx = K;
    }
    gemv_out o = { Y, ldy, bias, out };
    long blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long i = 0; i < blocks; i++) {
        long n = i * ROWS, rows = N - n < ROWS ? N - n : ROWS;
        for (long m = 0; m < M; m++) /* later rows of X find this block of W still in L1 */
            dot_rows(at(W, n * ldw, kind), ldw, rows, x + m * ldx, K, &o, m, n, kind);
    }
    free(x32);
    return 0;
}

int merger_gemv_bf16(const uint16_t *W, long N, long K, long ldw, const void *X, long M, long ldx, void *Y,
                     long ldy, const float *bias, int xkind, int out, int nthreads) {
    return gemv(W, N, K, ldw, X, M, ldx, Y, ldy, bias, xkind, out, nthreads, BF16);
}

int merger_gemv_fp16(const uint16_t *W, long N, long K, long ldw, const void *X, long M, long ldx, void *Y,
                     long ldy, const float *bias, int xkind, int out, int nthreads) {
    return gemv(W, N, K, ldw, X, M, ldx, Y, ldy, bias, xkind, out, nthreads, FP16);
}

int merger_gemv_fp32(const float *W, long N, long K, long ldw, const void *X, long M, long ldx, void *Y,
                     long ldy, const float *bias, int xkind, int out, int nthreads) {
    return gemv(W, N, K, ldw, X, M, ldx, Y, ldy, bias, xkind, out, nthreads, FP32);
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

/* exp of 8 float32 lanes, within 2 ulp of expf for |x| < 87 (all a softmax needs: x <= 0 here): 2^n * e^r
 * with n = round(x / ln 2), r = x - n ln 2 split in two parts, e^r by a degree-6 polynomial */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
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

/* P[g][s] = scale * (Q[g] . k[s]) for GS (<= 4) query heads that share one key head: each key row is
 * read once for all of them */
static inline __attribute__((always_inline)) void scores(const float *Q, long D, const float *k, long ss, long S,
                                                         float scale, float *P, const int GS) {
    for (long s = 0; s < S; s++) {
        const float *ks = k + s * ss;
        __m256 acc[4];
        for (int g = 0; g < GS; g++)
            acc[g] = _mm256_setzero_ps();
        long d = 0;
        for (; d + 8 <= D; d += 8) {
            __m256 kv = _mm256_loadu_ps(ks + d);
            for (int g = 0; g < GS; g++)
                acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(Q + g * D + d), kv, acc[g]);
        }
        for (int g = 0; g < GS; g++) {
            float r = hsum(acc[g]);
            for (long e = d; e < D; e++)  /* a head size that is not a multiple of 8 */
                r += Q[g * D + e] * ks[e];
            P[g * S + s] = r * scale;
        }
    }
}

/* p[s] <- exp(p[s] - max p) / sum, in place */
static inline void softmax(float *p, long S) {
    float m = -INFINITY, sum = 0.f;
    for (long s = 0; s < S; s++)
        m = p[s] > m ? p[s] : m;
    long s = 0;
    __m256 vm = _mm256_set1_ps(m), vs = _mm256_setzero_ps();
    for (; s + 8 <= S; s += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + s), vm));
        _mm256_storeu_ps(p + s, e);
        vs = _mm256_add_ps(vs, e);
    }
    sum = hsum(vs);
    for (; s < S; s++)
        sum += (p[s] = expf(p[s] - m));
    float inv = 1.0f / sum;
    for (s = 0; s < S; s++)
        p[s] *= inv;
}

/* O[g][d] = sum_s P[g][s] * v[s][d] for GS (<= 4) heads sharing one value head, 16 columns at a time:
 * each value row is read once for all of them */
static inline __attribute__((always_inline)) void weighted_rows(const float *P, const float *v, long ss, long S,
                                                                long D, float *O, const int GS) {
    long d = 0;
    for (; d + 16 <= D; d += 16) {
        __m256 acc[4][2];
        for (int g = 0; g < GS; g++)
            acc[g][0] = acc[g][1] = _mm256_setzero_ps();
        for (long s = 0; s < S; s++) {
            __m256 v0 = _mm256_loadu_ps(v + s * ss + d), v1 = _mm256_loadu_ps(v + s * ss + d + 8);
            for (int g = 0; g < GS; g++) {
                __m256 w = _mm256_broadcast_ss(P + g * S + s);
                acc[g][0] = _mm256_fmadd_ps(w, v0, acc[g][0]);
                acc[g][1] = _mm256_fmadd_ps(w, v1, acc[g][1]);
            }
        }
        for (int g = 0; g < GS; g++) {
            _mm256_storeu_ps(O + g * D + d, acc[g][0]);
            _mm256_storeu_ps(O + g * D + d + 8, acc[g][1]);
        }
    }
    for (; d < D; d++)
        for (int g = 0; g < GS; g++) {
            float acc = 0.f;
            for (long s = 0; s < S; s++)
                acc += P[g * S + s] * v[s * ss + d];
            O[g * D + d] = acc;
        }
}

/* attention of GS (<= 4) query heads that share one key/value head */
static inline __attribute__((always_inline)) void attend_heads(const float *Q, long D, const float *k,
                                                               const float *v, long ss, long S, float scale,
                                                               float *P, float *O, const int GS) {
    scores(Q, D, k, ss, S, scale, P, GS);
    for (int g = 0; g < GS; g++)
        softmax(P + g * S, S);
    weighted_rows(P, v, ss, S, D, O, GS);
}

/* One query per head over S cached keys, float32: Q, O [B, H, D] contiguous; K, V [B, KV, S, D] with the
 * given batch / head / position strides (the cache's views); query head h reads key/value head
 * h / (H / KV). O = softmax(scale * Q K^T) V; the query heads of a key/value head go in fours, so each
 * K and V row is read once per four heads; threads split (batch, key/value head, four). 0, or 1 if out of
 * memory. Measured against SDPA (16 or 32 heads, a quarter as many KV heads, 128 wide): 1.2-1.9x as fast
 * at 200 keys, 2.2-3.8x at 1000-8000. */
int merger_attend_fp32(const float *Q, long B, long H, long D, const float *K, const float *V, long KV, long S,
                       long sb, long sh, long ss, float scale, float *O, int nthreads) {
    long G = H / KV, chunks = (G + 3) / 4;
    float *buf = malloc((size_t)B * H * (S > 0 ? S : 1) * sizeof(float));
    if (!buf)
        return 1;
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(3) if (S * H >= 4096)
    for (long b = 0; b < B; b++)
        for (long kv = 0; kv < KV; kv++)
            for (long c = 0; c < chunks; c++) {
                long h = kv * G + 4 * c, n = G - 4 * c < 4 ? G - 4 * c : 4;
                const float *k = K + b * sb + kv * sh, *v = V + b * sb + kv * sh, *q = Q + (b * H + h) * D;
                float *p = buf + (b * H + h) * S, *o = O + (b * H + h) * D;
                switch (n) {  /* the head count fixed at compile time: the accumulators stay in registers */
                case 4: attend_heads(q, D, k, v, ss, S, scale, p, o, 4); break;
                case 3: attend_heads(q, D, k, v, ss, S, scale, p, o, 3); break;
                case 2: attend_heads(q, D, k, v, ss, S, scale, p, o, 2); break;
                default: attend_heads(q, D, k, v, ss, S, scale, p, o, 1); break;
                }
            }
    free(buf);
    return 0;
}
