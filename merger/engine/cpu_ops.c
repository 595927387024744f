/* The engine's per-op decode kernels: RMSNorm over rows, and one-query attention (cpu_attend.h) per call. */
#include "cpu_attend.h"

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
