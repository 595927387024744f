/* The dot products of weight rows with one vector that every matvec of the engine runs on (cpu_matmul.c's
 * gemv, cpu_step.c's decode step). */
#ifndef MERGER_CPU_DOTS_H
#define MERGER_CPU_DOTS_H
#include "cpu_simd.h"

#define ROWS 4 /* weight rows per step: 4 x 2 accumulators keep the FMA pipes busy */
/* While a block streams in, the next block's rows are prefetched: the hardware prefetcher alone stops at
 * every 4 KiB page, and this measured +20-30% read bandwidth (2-core EPYC: 25-28 GB/s against 20-22). */

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

/* dots() for `rows` rows (any number) from row n of an [N, K] weight stored in panels of P columns (native.py's
 * panels: panel q holds columns qP..qP+P-1 of every row, [N, P] row-major, so element (n, k) sits at
 * (k / P) N P + n P + k % P; P = K is the plain layout). Each panel's `rows` rows are one contiguous run, read
 * against x's P-element slice, which stays in L1 beside them: with whole rows of 5632 bf16 (x 11 KB) a 2-core
 * EPYC read 0.45-0.9 of a plain read at ~55 GB/s, 4 KB panels 0.85-1.0 (panels.py). Runs of PANEL_ROWS rows
 * or more keep the stream switches between panels rare (per ROWS rows they cost as much as whole rows). The
 * panels' float32 sums are added in order. */
#define PANEL_ROWS 64

/* rows per work item of a matvec over a weight with panel width P: ROWS for rows, PANEL_ROWS for panels */
static inline long item_rows(long K, long P) {
    return P < K ? PANEL_ROWS : ROWS;
}
static inline __attribute__((always_inline)) void pdots(const void *w, long N, long n, long P, long rows,
                                                        const void *x, long K, float *s, long side_from,
                                                        const int kind, const int xk) {
    if (P >= K) {
        for (long h = 0; h < rows; h += ROWS)
            dots(at(w, (n + h) * K, kind), K, rows - h < ROWS ? rows - h : ROWS, x, K, s + h, side_from, kind, xk);
        return;
    }
    for (long r = 0; r < rows; r++)
        s[r] = 0.f;
    for (long k0 = 0; k0 < K; k0 += P)
        for (long h = 0; h < rows; h += ROWS) {
            float t[ROWS];
            long r = rows - h < ROWS ? rows - h : ROWS;
            dots(at(w, k0 * N + (n + h) * P, kind), P, r, at(x, k0, xk), P, t, side_from, kind, xk);
            for (long i = 0; i < r; i++)
                s[h + i] += t[i];
        }
}

#endif
