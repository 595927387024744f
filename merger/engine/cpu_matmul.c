/* The engine's matmul kernels: gemv for decode (a few rows of X), gemm for prefill (many); see cpu_simd.h. */
#include "cpu_dots.h"

/* --- gemv ---------------------------------------------------------------------------------------- */

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

/* dot products of `rows` (<= PANEL_ROWS) consecutive weight rows n.. with one vector x (row m), to Y; W plain
 * with row stride ldw (rows <= ROWS), or in panels of P < K columns (pdots) */
static inline __attribute__((always_inline)) void dot_rows(const void *W, long N, long ldw, long P, long rows,
                                                           const void *x, long K, const gemv_out *o, long m,
                                                           long n, long side_from, const int kind, const int xk) {
    float s[PANEL_ROWS];
    if (P < K)
        pdots(W, N, n, P, rows, x, K, s, side_from, kind, xk);
    else
        dots(at(W, n * ldw, kind), ldw, rows, x, K, s, side_from, kind, xk);
    for (long r = 0; r < rows; r++)
        put(o, m, n + r, s[r]);
}

/* Y[m][n] = sum_k X[m][k] * W[n][k] (+ bias[n]) for a few rows m. X is bf16, fp16 or float32 (xkind): with
 * bf16 weights bf16 X is read as it is, any other X is widened once up front; the sums are float32, rounded
 * once into Y's type. W has row stride ldw, or panels of P < K columns (then contiguous). 0, or 1 if out of
 * memory. */
static inline __attribute__((always_inline)) int gemv(const void *W, long N, long K, long ldw, long P,
                                                      const void *X, long M, long ldx, void *Y, long ldy,
                                                      const float *bias, int xkind, int out, long side_from,
                                                      int nthreads, const int kind) {
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
    long R = item_rows(K, P), blocks = (N + R - 1) / R;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long i = 0; i < blocks; i++) {
        long n = i * R, rows = N - n < R ? N - n : R;
        for (long m = 0; m < M; m++) { /* later rows of X find this block of W still in L1 */
            if (paired)
                dot_rows(W, N, ldw, P, rows, at(X, m * ldx, BF16), K, &o, m, n, side_from, kind, BF16);
            else
                dot_rows(W, N, ldw, P, rows, (const float *)X + m * ldx, K, &o, m, n, side_from, kind, FP32);
        }
    }
    free(x32);
    return 0;
}

int merger_gemv_bf16(const uint16_t *W, long N, long K, long ldw, long P, const void *X, long M, long ldx,
                     void *Y, long ldy, const float *bias, int xkind, int out, long side_from, int nthreads) {
    return gemv(W, N, K, ldw, P, X, M, ldx, Y, ldy, bias, xkind, out, side_from, nthreads, BF16);
}

int merger_gemv_fp16(const uint16_t *W, long N, long K, long ldw, long P, const void *X, long M, long ldx,
                     void *Y, long ldy, const float *bias, int xkind, int out, long side_from, int nthreads) {
    return gemv(W, N, K, ldw, P, X, M, ldx, Y, ldy, bias, xkind, out, side_from, nthreads, FP16);
}

int merger_gemv_fp32(const float *W, long N, long K, long ldw, long P, const void *X, long M, long ldx,
                     void *Y, long ldy, const float *bias, int xkind, int out, long side_from, int nthreads) {
    return gemv(W, N, K, ldw, P, X, M, ldx, Y, ldy, bias, xkind, out, side_from, nthreads, FP32);
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

/* the element index of W[n][k]: row stride ldw, or in panels of P < K columns ([K / P][N][P], pdots) */
static inline long w_index(long n, long k, long N, long K, long ldw, long P) {
    return P < K ? (k / P) * N * P + n * P + k % P : n * ldw + k;
}

/* Wp[i][k] = W[n0 + i][p + k] as float32, zero rows from `rows` on */
static inline __attribute__((always_inline)) void pack_w(const void *W, long N, long K, long ldw, long P, long n0,
                                                         long rows, long p, long kc, float *Wp, const int kind) {
    for (long i = 0; i < NR; i++) {
        float *dst = Wp + i * KC;
        if (i >= rows) {
            memset(dst, 0, kc * sizeof(float));
            continue;
        }
        for (long k = 0; k < kc;) {  /* one run per panel the slice touches (rows: one run) */
            long run = P < K ? P - (p + k) % P : kc, base = w_index(n0 + i, p + k, N, K, ldw, P), j = 0;
            run = run < kc - k ? run : kc - k;
            for (; j + 8 <= run; j += 8)
                _mm256_storeu_ps(dst + k + j, load8(W, base + j, kind));
            for (; j < run; j++)
                dst[k + j] = load1(W, base + j, kind);
            k += run;
        }
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

/* Y[m][n] = sum_k X[m][k] * W[n][k] (+ bias[n]) in Y's type `out`; W with row stride ldw, or in panels of
 * P < K columns. 0, or 1 if out of memory. */
static inline __attribute__((always_inline)) int gemm(const void *W, long N, long K, long ldw, long P,
                                                      const float *X, long M, long ldx, void *Y, long ldy,
                                                      const float *bias, int out, int nthreads, const int kind) {
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
                        pack_w(W, N, K, ldw, P, n0, rows, p, kc, Wp + s * NR * KC, kind);
                        /* what this strip packs next (its next slice, or the next block's first) is pulled
                         * toward L2 now: 6 short rows per strip defeat the hardware prefetcher */
                        long pn = p + KC, nn = n0;
                        if (pn >= K) {
                            pn = 0;
                            nn = n0 + nb * NR;
                        }
                        for (long i = 0; i < NR && nn + i < N; i++)
                            for (long k = 0; k < KC && pn + k < K; k += (kind == FP32 ? 16 : 32))
                                _mm_prefetch(at(W, w_index(nn + i, pn + k, N, K, ldw, P), kind), _MM_HINT_T1);
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

int merger_gemm_bf16(const uint16_t *W, long N, long K, long ldw, long P, const float *X, long M, long ldx,
                     void *Y, long ldy, const float *bias, int out, int nthreads) {
    return gemm(W, N, K, ldw, P, X, M, ldx, Y, ldy, bias, out, nthreads, BF16);
}

int merger_gemm_fp16(const uint16_t *W, long N, long K, long ldw, long P, const float *X, long M, long ldx,
                     void *Y, long ldy, const float *bias, int out, int nthreads) {
    return gemm(W, N, K, ldw, P, X, M, ldx, Y, ldy, bias, out, nthreads, FP16);
}

int merger_gemm_fp32(const float *W, long N, long K, long ldw, long P, const float *X, long M, long ldx,
                     void *Y, long ldy, const float *bias, int out, int nthreads) {
    return gemm(W, N, K, ldw, P, X, M, ldx, Y, ldy, bias, out, nthreads, FP32);
}
