/* What the engine's CPU kernel sources share (cpu_matmul.c, cpu_ops.c, cpu_step.c, built into one library by
 * native.py, AVX2 + FMA + F16C): the element types, loads and stores of bf16 / fp16 / fp32 elements as float32
 * (rounded as torch rounds), a horizontal sum, exp of 8 lanes, and the rounding to the model type that the
 * decode step applies where the per-op path holds a tensor in that type. Work is split across OpenMP threads
 * (the runtime torch already loaded, so no second pool). Weights W are [N, K] row-major with row stride ldw
 * (elements).
 *
 * gemv: Y[m, n] = sum_k X[m, k] * W[n, k] (+ bias) for a few rows m (decode), bound by how fast W is read.
 *   Each weight element is widened to float32 in registers and used for all M rows while it is in L1; X
 *   and Y may be any of the three types, so a decode matmul is one call.
 * gemm: the same for many rows (prefill), bound by FMA throughput; X float32, Y any type. Weights are
 *   widened while packed into L2-sized blocks: no float32 copy of W.
 * rmsnorm and attend (cpu_ops.c): RMSNorm rows; one query per head over a KV cache of any of the three
 *   types, read as stored.
 * step (cpu_step.c): one token of a batch-1 decode through every layer and the logits, in one call.
 */
#ifndef MERGER_CPU_SIMD_H
#define MERGER_CPU_SIMD_H
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
#endif
