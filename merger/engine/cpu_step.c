#include "cpu_attend.h"
#include "cpu_dots.h"

/* --- the decode step ------------------------------------------------------------------------------ */
/* One token of a batch-1 decode, every layer and the logits, in one call and one parallel region: the
 * per-layer tables below are built once per KV cache (step.py) and replayed for each token, as llama.cpp
 * replays its graph. Torch's per-op cost (5-40 us a call, a dozen calls a layer) and the thread pool's
 * start per op are gone; the threads meet at 5 barriers a layer, one after each matmul (an MoE layer at one
 * more, before the experts' sums are added). Each thread keeps its own copy of the residual stream and the
 * normed vector and does the vector-sized work itself, so only the matmul outputs and the attention partials
 * are shared. Rounding follows the per-op path (and so transformers): every tensor the model would hold in
 * its dtype is rounded to it where the op ends. */

typedef struct {
    const void *wqkv, *wo, *w13, *w2, *router;       /* router NULL: a dense MLP; else [E, D] experts */
    const float *bqkv, *bo, *b13, *b2;               /* float32 biases or NULL */
    const void *attn_norm, *ffn_norm, *q_norm, *k_norm; /* q/k norms [Dh] or NULL */
    void *k, *v;                                     /* the layer's cache [KV, max_len, Dh], model type */
    long ffn;                                        /* the MLP's (or each expert's) hidden width F */
    long window;                                     /* > 0: only the last `window` keys */
    long p_qkv, p_o, p_13, p_2;                      /* each weight's panel width (pdots; its K: plain) */
} step_layer;

typedef struct {
    long dim, heads, kv_heads, head_dim, experts, top_k, layers, vocab, max_len;
    long ffn_buf;                                    /* max over layers of F x (experts ? top_k : 1) */
    long side_from;                                  /* dots(): rows of K >= this side by side */
    int normalize;                                   /* renormalise the top-k routing weights */
    float eps, scale;                                /* RMSNorm epsilon; attention score scale */
    const void *embed, *norm, *output;               /* [V, D], [D], [V, D] (output in panels of p_out) */
    long p_out;
    const step_layer *layer;
} step_model;

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

/* the guided schedule's smallest share of a matvec's items (item_rows): chunk_blocks for rows, one item of
 * PANEL_ROWS panel rows (already 256 KB or more) for panels */
static inline long chunk_items(long K, long P, const int kind) {
    return item_rows(K, P) == ROWS ? chunk_blocks(K, kind) : 1;
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

/* out[n] = rnd(W[n] . x + bias[n]) for n < N (W [N, K] contiguous or in panels of P, x an operand()); shared
 * work, ends at a barrier */
static inline __attribute__((always_inline)) void step_matvec(const void *W, long N, long K, long P,
                                                              const void *x, const float *bias, float *out,
                                                              int round, long side_from, const int kind) {
    long R = item_rows(K, P), blocks = (N + R - 1) / R, chunk = chunk_items(K, P, kind);
#pragma omp for schedule(guided, chunk)
    for (long i = 0; i < blocks; i++) {
        long n = i * R, rows = N - n < R ? N - n : R;
        float s[PANEL_ROWS];
        pdots(W, N, n, P, rows, x, K, s, side_from, kind, XK(kind));
        for (long r = 0; r < rows; r++) {
            float v = s[r] + (bias ? bias[n + r] : 0.f);
            out[n + r] = round ? rnd(v, kind) : v;
        }
    }
}

/* p[i] = silu(gate_i) * up_i with gate_i = W13[i] . x, up_i = W13[F + i] . x (+ biases): the gated MLP's
 * first half for `experts` stacked weights (W13 + j * 2FK, x an operand() shared, p + j * F written as an
 * operand); shared work, ends at a barrier. An item is GATE_UP_ROWS gate rows read in one run, then as many up
 * rows: gate and up alternating every ROWS rows ran at 0.4-0.9 of a plain read when the machine's bandwidth was
 * high (2-core EPYC at ~55 GB/s, K = 2048 bf16, a C loop over 768 MB of weights), 128-row runs at 0.85-1.0. */
#ifndef GATE_UP_ROWS
#define GATE_UP_ROWS 128
#endif
static inline __attribute__((always_inline)) void step_gate_up(const void *const *W13, long n_w, long F, long K,
                                                               long P, const void *x, const float *b13, void *p,
                                                               long side_from, const int kind) {
    long per = (F + GATE_UP_ROWS - 1) / GATE_UP_ROWS;
#pragma omp for schedule(guided, 1)
    for (long it = 0; it < n_w * per; it++) {
        long j = it / per, i0 = (it % per) * GATE_UP_ROWS, rows = F - i0 < GATE_UP_ROWS ? F - i0 : GATE_UP_ROWS;
        float g[GATE_UP_ROWS], u[GATE_UP_ROWS];
        pdots(W13[j], 2 * F, i0, P, rows, x, K, g, side_from, kind, XK(kind));
        pdots(W13[j], 2 * F, F + i0, P, rows, x, K, u, side_from, kind, XK(kind));
        for (long r = 0; r < rows; r++) {
            g[r] = rnd(g[r] + (b13 ? b13[i0 + r] : 0.f), kind);
            u[r] = rnd(u[r] + (b13 ? b13[F + i0 + r] : 0.f), kind);
        }
        for (long c = 0; c < rows; c += 8) {
            long n = rows - c < 8 ? rows - c : 8;
            float gc[8] = {0}, uc[8] = {0}, out[8];
            memcpy(gc, g + c, n * sizeof(float));
            memcpy(uc, u + c, n * sizeof(float));
            __m256 y = swiglu8(_mm256_loadu_ps(gc), _mm256_loadu_ps(uc), kind);
            if (XK(kind) == BF16) {
                uint16_t h[8];
                _mm_storeu_si128((__m128i *)h, to_bf16x8(y));  /* exact: swiglu8 rounded to bf16 */
                memcpy((uint16_t *)p + j * F + i0 + c, h, n * sizeof(uint16_t));
            } else {
                _mm256_storeu_ps(out, y);
                memcpy((float *)p + j * F + i0 + c, out, n * sizeof(float));
            }
        }
    }
}

/* a[n] = rnd(sum_j rnd(W2_j[n] . p_j) * wt_j) over the chosen experts in order (the per-op path's float32
 * accumulation), or rnd(W2[n] . p + b2[n]) for a dense MLP (p: the operands gate_up wrote); shared work, ends
 * at a barrier. Each expert's rows are one pass with its own p_j (ex[j][n] holds the rounded sums), so p_j
 * stays in L1 rather than alternating with the other experts' inputs row by row. */
static inline __attribute__((always_inline)) void step_down(const void *const *W2, long n_w, long D, long F,
                                                            long P, const void *p, const float *wt,
                                                            const float *b2, float *a, float *ex, long side_from,
                                                            const int kind) {
    long R = item_rows(F, P), blocks = (D + R - 1) / R, chunk = chunk_items(F, P, kind);
#pragma omp for schedule(guided, chunk)
    for (long it = 0; it < n_w * blocks; it++) {
        long j = it / blocks, n = (it % blocks) * R, rows = D - n < R ? D - n : R;
        float s[PANEL_ROWS];
        pdots(W2[j], D, n, P, rows, at(p, j * F, XK(kind)), F, s, side_from, kind, XK(kind));
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
            step_matvec(ly->wqkv, qkv_n, D, ly->p_qkv, operand(hn, D, xb, kind), ly->bqkv, qkv, 1, sf, kind);
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
            step_matvec(ly->wo, D, H * Dh, ly->p_o, operand(o, H * Dh, xb, kind), ly->bo, a, 1, sf, kind);
            add_rows(x, a, D, kind);
            norm_row(x, ly->ffn_norm, D, m->eps, hn, kind);
            const void *hx = operand(hn, D, xb, kind), *w13[64], *w2[64];
            if (!ly->router) {
                w13[0] = ly->w13;
                w2[0] = ly->w2;
                step_gate_up(w13, 1, F, D, ly->p_13, hx, ly->b13, p, sf, kind);
                step_down(w2, 1, D, F, ly->p_2, p, NULL, ly->b2, a, ex, sf, kind);
            } else {
                route_token(hn, ly->router, m->experts, D, k_top, m->normalize, wt, ids, kind);
                for (long j = 0; j < k_top; j++) {
                    w13[j] = at(ly->w13, ids[j] * 2 * F * D, kind);
                    w2[j] = at(ly->w2, ids[j] * D * F, kind);
                }
                step_gate_up(w13, k_top, F, D, ly->p_13, hx, NULL, p, sf, kind);
                step_down(w2, k_top, D, F, ly->p_2, p, wt, NULL, a, ex, sf, kind);
            }
            add_rows(x, a, D, kind);
        }
        norm_row(x, m->norm, D, m->eps, hn, kind);
        step_matvec(m->output, m->vocab, D, m->p_out, operand(hn, D, xb, kind), NULL, logits, 0, sf, kind);
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
