/* Kernels for the merge methods, built and loaded by native.py.
 *
 * rank_keep: DELLA's MagPrune draw for rows of a 2-D block. Per row, every entry's rank by magnitude
 * (ascending, equal magnitudes by position) comes from a stable LSD radix sort of integer keys: the value's
 * bits without the sign, every NaN folded to one key just above infinity (so NaNs rank last, in order).
 * Entry i is kept when u[i] < rank * scale + offset, computed in double with two roundings (the multiply,
 * then the add), exactly as the torch path computes it; build with -ffp-contract=off so no FMA joins them.
 *
 * combine: pass B of the task-vector family (task_arithmetic.py) over one contiguous block, element by
 * element, in one pass instead of some twenty torch ops: each model's delta rounded to the input type, its
 * mask, the weighted sum, TIES' sign election and divisor, lambda, the base, the output rounded to the input
 * type. Every step is the operation torch performs, in its order: a torch `add_(x, alpha=a)` is a fused
 * multiply-add of x and float(a) on CPUs with FMA (so this kernel exists only where FMA and F16C do), a
 * product by a mask is a real product (a dropped negative entry is -0), division is true division. A NaN
 * anywhere returns 2 and the caller redoes the block with torch, whose NaN bit patterns differ by code path.
 *
 * mt_seed / mt_uniforms: the MT19937 stream of a torch CPU generator seeded with the same seed (its low 32 bits,
 * init_genrand), as torch.rand(dtype=float64) reads it: two words per draw, (first << 32 | second) mod 2^53
 * times 2^-53. DARE and DELLA draw their masks from it.
 *
 * linear: Σ wᵢ·tᵢ over float32 in one pass, with the rounding of linear.py's torch ops.
 *
 * key_hist: histograms of the same magnitude keys, from which native.top_cuts reads TIES' exact threshold in
 * two passes over the inputs instead of find_cut's counting passes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* rows x width values of elem_bytes (2 or 4) each, row stride ld elements; u and keep are contiguous rows.
 * Returns 0, or 1 when scratch memory could not be allocated (nothing written then). */
int merger_rank_keep(const void *x, int elem_bytes, long rows, long width, long ld, uint32_t absmask,
                     uint32_t nan_key, const double *u, double scale, double offset, uint8_t *keep) {
    if (width <= 0 || width > 0x7FFFFFFFL)
        return 1;
    /* each entry is one word, key << 32 | position, so a pass moves it with one store */
    uint64_t *buf = malloc(sizeof(uint64_t) * 2 * (size_t)width);
    if (!buf)
        return 1;
    const int digits = elem_bytes; /* one 8-bit digit per key byte */
    uint32_t hist[4][256];
    for (long r = 0; r < rows; r++) {
        memset(hist, 0, sizeof(hist));
        uint64_t *src = buf, *dst = buf + width;
        const uint32_t *row32 = (const uint32_t *)x + r * ld;
        const uint16_t *row16 = (const uint16_t *)x + r * ld;
        for (long i = 0; i < width; i++) {
            uint32_t k = (elem_bytes == 4 ? row32[i] : row16[i]) & absmask;
            k = k > nan_key ? nan_key : k;
            src[i] = (uint64_t)k << 32 | (uint64_t)i;
            for (int d = 0; d < digits; d++)
                hist[d][(k >> (8 * d)) & 255]++;
        }
        for (int d = 0; d < digits; d++) {
            const int shift = 32 + 8 * d;
            uint32_t *h = hist[d];
            if (h[(src[0] >> shift) & 255] == (uint32_t)width)
                continue; /* every key has this digit: the pass would not move anything */
            uint32_t at = 0;
            for (int b = 0; b < 256; b++) {
                uint32_t c = h[b];
                h[b] = at;
                at += c;
            }
            for (long i = 0; i < width; i++) {
                uint64_t v = src[i];
                dst[h[(v >> shift) & 255]++] = v;
            }
            uint64_t *t = src; src = dst; dst = t;
        }
        const double *ur = u + r * width;
        uint8_t *kr = keep + r * width;
        for (long j = 0; j < width; j++) {
            uint32_t i = (uint32_t)src[j];
            double p = (double)j * scale;
            p = p + offset;
            kr[i] = ur[i] < p;
        }
    }
    free(buf);
    return 0;
}

typedef struct {
    uint32_t mt[624];
    int32_t next;
} mt_state;

void merger_mt_seed(mt_state *s, uint64_t seed) {
    s->mt[0] = (uint32_t)seed;
    for (int i = 1; i < 624; i++)
        s->mt[i] = 1812433253u * (s->mt[i - 1] ^ (s->mt[i - 1] >> 30)) + (uint32_t)i;
    s->next = 624;
}

static inline uint32_t mt_mix(uint32_t hi, uint32_t lo, uint32_t far) {
    uint32_t y = (hi & 0x80000000u) | (lo & 0x7FFFFFFFu);
    return far ^ (y >> 1) ^ ((0u - (y & 1u)) & 0x9908B0DFu);
}

static void mt_twist(mt_state *s) {
    uint32_t *mt = s->mt;
    int i = 0;
    for (; i < 624 - 397; i++)
        mt[i] = mt_mix(mt[i], mt[i + 1], mt[i + 397]);
    for (; i < 623; i++)
        mt[i] = mt_mix(mt[i], mt[i + 1], mt[i + 397 - 624]);
    mt[623] = mt_mix(mt[623], mt[0], mt[396]);
    s->next = 0;
}

static inline uint32_t mt_temper(uint32_t y) {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9D2C5680u;
    y ^= (y << 15) & 0xEFC60000u;
    return y ^ (y >> 18);
}

void merger_mt_uniforms(mt_state *s, long n, double *out) {
    long i = 0;
    while (i < n) {
        if (s->next >= 624)
            mt_twist(s);
        if (s->next == 623) { /* a draw whose two words straddle a twist */
            uint64_t first = mt_temper(s->mt[623]);
            mt_twist(s);
            uint64_t x = (first << 32) | mt_temper(s->mt[s->next++]);
            out[i++] = (double)(int64_t)(x & ((1ull << 53) - 1)) * 0x1p-53;
            continue;
        }
        const uint32_t *mt = s->mt + s->next;
        long m = (624 - s->next) / 2;
        if (m > n - i)
            m = n - i;
        long j = 0;
#if defined(__AVX2__)
        /* four draws at a time, exactly as below: the 53-bit integer is converted as its high 21 and low 32
         * bits, each through the 2^52 bias (exact), and their sum is exact below 2^53 */
        const __m256i bias = _mm256_set1_epi64x(0x4330000000000000LL), low32 = _mm256_set1_epi64x(0xFFFFFFFFLL);
        const __m256i b7 = _mm256_set1_epi32((int)0x9D2C5680u), b15 = _mm256_set1_epi32((int)0xEFC60000u);
        const __m256i high21 = _mm256_set1_epi64x((1LL << 21) - 1);
        const __m256d two52 = _mm256_set1_pd(0x1p52), two32 = _mm256_set1_pd(0x1p32), unit = _mm256_set1_pd(0x1p-53);
        for (; j + 4 <= m; j += 4) {
            __m256i y = _mm256_loadu_si256((const __m256i *)(mt + 2 * j));
            y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 11));
            y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 7), b7));
            y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 15), b15));
            y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 18));
            __m256i x = _mm256_shuffle_epi32(y, 0xB1);           /* each 64-bit lane: first << 32 | second */
            __m256i hi = _mm256_and_si256(_mm256_srli_epi64(x, 32), high21), lo = _mm256_and_si256(x, low32);
            __m256d dh = _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(hi, bias)), two52);
            __m256d dl = _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(lo, bias)), two52);
            _mm256_storeu_pd(out + i + j, _mm256_mul_pd(_mm256_add_pd(_mm256_mul_pd(dh, two32), dl), unit));
        }
#endif
        for (; j < m; j++) {
            uint64_t x = ((uint64_t)mt_temper(mt[2 * j]) << 32) | mt_temper(mt[2 * j + 1]);
            out[i + j] = (double)(int64_t)(x & ((1ull << 53) - 1)) * 0x1p-53;
        }
        s->next += (int32_t)(2 * m);
        i += m;
    }
}

#if defined(__FMA__) && defined(__F16C__)
enum { KEEP_ALL, DROP_ALL, CUTS, UNIFORM, BOOLS };

/* One model's input to combine; field order and types mirror native.py's CombineModel. */
typedef struct {
    const void *t;              /* the model's block, same type and length as the base's */
    int32_t kind;               /* how its mask is made */
    int32_t has_inner;          /* CUTS: drop the inner cut's members from the outer cut's */
    int64_t outer_thr, outer_left, inner_thr, inner_left; /* CUTS: keys above thr, then `left` equal to it */
    const double *u;            /* UNIFORM: keep where u < p */
    double p;
    const uint8_t *bools;       /* BOOLS: the mask itself */
    float alpha;                /* float(weight * rescale) */
    float weight;               /* float(weight): the divisor's step */
    int32_t elects;             /* weight != 0: takes part in the election */
    int32_t positive;           /* weight > 0 */
} combine_model;

enum { T_BF16, T_FP16, T_FP32 };
#define TILE 256
#define MAX_MODELS 64

/* len elements of type at p + off, as float32 */
static inline void load_tile(const void *p, long off, int len, float *x, const int type) {
    if (type == T_FP32) {
        memcpy(x, (const float *)p + off, sizeof(float) * len);
    } else if (type == T_BF16) {
        const uint16_t *h = (const uint16_t *)p + off;
        uint32_t *u = (uint32_t *)x;
        for (int j = 0; j < len; j++)
            u[j] = (uint32_t)h[j] << 16;
    } else {
        const uint16_t *h = (const uint16_t *)p + off;
        int j = 0;
        for (; j + 8 <= len; j += 8)
            _mm256_storeu_ps(x + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + j))));
        for (; j < len; j++)
            x[j] = _cvtsh_ss(h[j]);
    }
}

/* x rounded to the type in place (NaN never reaches the caller's result) and the keys of |x| as torch's
 * keys_of orders them: the bits without the sign */
static inline void round_tile(float *x, int32_t *key, int len, const int type) {
    uint32_t *u = (uint32_t *)x;
    if (type == T_FP32) {
        for (int j = 0; j < len; j++)
            key[j] = (int32_t)(u[j] & 0x7FFFFFFF);
    } else if (type == T_BF16) {
        for (int j = 0; j < len; j++) {
            uint32_t h = (u[j] + 0x7FFF + ((u[j] >> 16) & 1)) >> 16; /* round to nearest even */
            key[j] = (int32_t)(h & 0x7FFF);
            u[j] = h << 16;
        }
    } else {
        uint16_t h[TILE];
        int j = 0;
        for (; j + 8 <= len; j += 8)
            _mm_storeu_si128((__m128i *)(h + j), _mm256_cvtps_ph(_mm256_loadu_ps(x + j), _MM_FROUND_TO_NEAREST_INT));
        for (; j < len; j++)
            h[j] = _cvtss_sh(x[j], _MM_FROUND_TO_NEAREST_INT);
        load_tile(h, 0, len, x, T_FP16);
        for (j = 0; j < len; j++)
            key[j] = h[j] & 0x7FFF;
    }
}

static inline void store_tile(void *p, long off, int len, float *x, const int type) {
    if (type == T_FP32) {
        memcpy((float *)p + off, x, sizeof(float) * len);
    } else if (type == T_BF16) {
        const uint32_t *u = (const uint32_t *)x;
        uint16_t *h = (uint16_t *)p + off;
        for (int j = 0; j < len; j++)
            h[j] = (uint16_t)((u[j] + 0x7FFF + ((u[j] >> 16) & 1)) >> 16);
    } else {
        uint16_t *h = (uint16_t *)p + off;
        int j = 0;
        for (; j + 8 <= len; j += 8)
            _mm_storeu_si128((__m128i *)(h + j), _mm256_cvtps_ph(_mm256_loadu_ps(x + j), _MM_FROUND_TO_NEAREST_INT));
        for (; j < len; j++)
            h[j] = _cvtss_sh(x[j], _MM_FROUND_TO_NEAREST_INT);
    }
}

/* keep[j] (1 or 0) = membership in a cut: keys above thr, then the first `left` keys equal to it */
static inline void cut_tile(const int32_t *key, int len, int64_t thr, int64_t *left, float *keep, int invert) {
    const float in = invert ? 0.0f : 1.0f, out = invert ? 1.0f : 0.0f;
    float t[TILE];
    for (int j = 0; j < len; j++)
        t[j] = (int64_t)key[j] > thr ? in : out;
    if (*left > 0) {
        for (int j = 0; j < len && *left > 0; j++)
            if ((int64_t)key[j] == thr) {
                t[j] = in;
                (*left)--;
            }
    }
    if (invert) /* the inner cut's members leave the outer cut's */
        for (int j = 0; j < len; j++)
            keep[j] = keep[j] * t[j];
    else
        memcpy(keep, t, sizeof(float) * len);
}

static inline __attribute__((always_inline)) int combine(long n, const void *b, combine_model *m, int count,
                                                        int elect, int normalize, float total, int scale_by,
                                                        float lambda, void *out, const int type) {
    if (count < 1 || count > MAX_MODELS)
        return 1;
    static __thread float k[MAX_MODELS][TILE];
    float bv[TILE], acc[TILE], keep[TILE], sign[TILE], sum[TILE], divisor[TILE];
    int32_t key[TILE];
    int nan = 0;
    for (long off = 0; off < n; off += TILE) {
        const int len = n - off < TILE ? (int)(n - off) : TILE;
        load_tile(b, off, len, bv, type);
        for (int i = 0; i < count; i++) {
            float *d = k[i];
            load_tile(m[i].t, off, len, d, type);
            for (int j = 0; j < len; j++)
                d[j] = d[j] - bv[j];
            round_tile(d, key, len, type);
            switch (m[i].kind) {
            case KEEP_ALL:
                continue;
            case DROP_ALL:
                for (int j = 0; j < len; j++)
                    keep[j] = 0.0f;
                break;
            case CUTS:
                cut_tile(key, len, m[i].outer_thr, &m[i].outer_left, keep, 0);
                if (m[i].has_inner)
                    cut_tile(key, len, m[i].inner_thr, &m[i].inner_left, keep, 1);
                break;
            case UNIFORM: {
                const double *u = m[i].u + off;
                const double p = m[i].p;
                for (int j = 0; j < len; j++)
                    keep[j] = u[j] < p ? 1.0f : 0.0f;
                break;
            }
            default: {
                const uint8_t *bools = m[i].bools + off;
                for (int j = 0; j < len; j++)
                    keep[j] = bools[j] ? 1.0f : 0.0f;
            }
            }
            for (int j = 0; j < len; j++) /* a product, as torch's: a dropped negative entry is -0 */
                d[j] = d[j] * keep[j];
        }
        const float a0 = m[0].alpha;
        for (int j = 0; j < len; j++)
            acc[j] = k[0][j] * a0;
        for (int i = 1; i < count; i++) {
            const float a = m[i].alpha;
            for (int j = 0; j < len; j++)
                acc[j] = fmaf(k[i][j], a, acc[j]);
        }
        if (elect) {
            for (int j = 0; j < len; j++) {
                sign[j] = acc[j] >= 0 ? 1.0f : -1.0f;
                sum[j] = 0.0f;
                divisor[j] = 0.0f;
            }
            for (int i = 0; i < count; i++) {
                if (!m[i].elects)
                    continue;
                const float a = m[i].alpha, w = m[i].weight;
                const float flip = m[i].positive ? 1.0f : -1.0f; /* w < 0: agreeing entries have s < 0 */
                for (int j = 0; j < len; j++) {
                    const float s = k[i][j] * sign[j] * flip; /* exact: only signs change */
                    const float agree = s > 0 ? 1.0f : 0.0f;
                    sum[j] = fmaf(k[i][j] * agree, a, sum[j]);
                    divisor[j] = fmaf(agree, w, divisor[j]);
                }
            }
            if (normalize)
                for (int j = 0; j < len; j++)
                    acc[j] = sum[j] / (divisor[j] == 0 ? 1.0f : divisor[j]);
            else
                memcpy(acc, sum, sizeof(float) * len);
        } else if (normalize) {
            for (int j = 0; j < len; j++)
                acc[j] = acc[j] / total;
        }
        if (scale_by)
            for (int j = 0; j < len; j++)
                acc[j] = acc[j] * lambda;
        int bad = 0;
        for (int j = 0; j < len; j++) {
            acc[j] = acc[j] + bv[j];
            bad |= acc[j] != acc[j];
        }
        for (int i = 0; i < count; i++)
            for (int j = 0; j < len; j++)
                bad |= k[i][j] != k[i][j];
        nan |= bad;
        store_tile(out, off, len, acc, type);
    }
    return nan ? 2 : 0;
}

/* Histograms of magnitude keys, for find_cut's exact threshold in two passes instead of a sort: the keys of
 * d = round(t - b) (the torch path's keys_of of the delta). high: hist[key >> 15] over every entry (for 16-bit
 * types the key itself, which is < 2^15). low: hist[key & 0x7FFF] over the entries whose key >> 15 is `high`
 * (32-bit types only). Returns 2 when a NaN is met (the caller takes the torch path), else 0. */
static inline __attribute__((always_inline)) int key_hist(long n, const void *t, const void *b, int64_t high,
                                                         int64_t *hist, const int type) {
    float tv[TILE], bv[TILE];
    int32_t key[TILE];
    int nan = 0;
    for (long off = 0; off < n; off += TILE) {
        const int len = n - off < TILE ? (int)(n - off) : TILE;
        load_tile(t, off, len, tv, type);
        load_tile(b, off, len, bv, type);
        int bad = 0;
        for (int j = 0; j < len; j++) {
            tv[j] = tv[j] - bv[j];
            bad |= tv[j] != tv[j];
        }
        nan |= bad;
        round_tile(tv, key, len, type);
        if (high < 0) {
            const int shift = type == T_FP32 ? 15 : 0;
            for (int j = 0; j < len; j++)
                hist[key[j] >> shift]++;
        } else {
            for (int j = 0; j < len; j++)
                if ((key[j] >> 15) == high)
                    hist[key[j] & 0x7FFF]++;
        }
    }
    return nan ? 2 : 0;
}

#define KEY_HIST(name, type)                                                                                 \
    int merger_key_hist_##name(long n, const void *t, const void *b, int64_t high, int64_t *hist) {         \
        return key_hist(n, t, b, high, hist, type);                                                           \
    }
KEY_HIST(bf16, T_BF16)
KEY_HIST(fp16, T_FP16)
KEY_HIST(fp32, T_FP32)

/* linear: out = t[0]·w[0] + t[1]·w[1] + ... over one contiguous float32 tensor, as linear.py's torch ops compute
 * it: the first product, then one fused multiply-add per further model (torch's add_(t, alpha=w)). Only float32:
 * torch's own bf16/fp16 add_ rounds alpha to the type and, in a tensor's last elements, the product too. */
int merger_linear_fp32(long n, const float *const *t, const float *w, int count, float *out) {
    if (count < 1 || count > MAX_MODELS)
        return 1;
    float acc[TILE];
    for (long off = 0; off < n; off += TILE) {
        const int len = n - off < TILE ? (int)(n - off) : TILE;
        const float *t0 = t[0] + off;
        const float w0 = w[0];
        for (int j = 0; j < len; j++)
            acc[j] = t0[j] * w0;
        for (int i = 1; i < count; i++) {
            const float *ti = t[i] + off;
            const float wi = w[i];
            for (int j = 0; j < len; j++)
                acc[j] = fmaf(ti[j], wi, acc[j]);
        }
        memcpy(out + off, acc, sizeof(float) * len);
    }
    return 0;
}

#define COMBINE(name, type)                                                                                  \
    int merger_combine_##name(long n, const void *b, combine_model *m, int count, int elect, int normalize,  \
                              float total, int scale_by, float lambda, void *out) {                           \
        return combine(n, b, m, count, elect, normalize, total, scale_by, lambda, out, type);               \
    }
COMBINE(bf16, T_BF16)
COMBINE(fp16, T_FP16)
COMBINE(fp32, T_FP32)
#endif
