/* One-query attention over a range of keys, shared by cpu_ops.c's attend and cpu_step.c's decode step. */
#ifndef MERGER_CPU_ATTEND_H
#define MERGER_CPU_ATTEND_H
#include "cpu_simd.h"

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
#endif
