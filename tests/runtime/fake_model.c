/* A toy model implementing the sparsec native ABI v3, for runtime tests.
 *
 * Not a transformer, but it touches everything the runtime manages: the weights
 * pointer (embeddings, output matrix, per-layer value scales, a position bias) and
 * every KV-cache slot 0..p of every layer and head. tests/runtime/fake.py has the
 * numpy twin. Dimensions are compile-time constants, as in generated code:
 *   V vocab, L layers, KVH kv heads, HD head dim (hidden D = KVH*HD), C capacity,
 *   T max tokens per call. FAKE_ABI overrides the reported ABI version,
 *   FAKE_CREATE_FAILS makes sparsec_create return NULL, FAKE_PRECISION (0 fp32, 1 int8)
 *   the reported precision; the other build constants are the dimensions above.
 *
 * Token t at position p, x = emb[t] (D floats, kept in double):
 *   for each layer l, head g (x_g = x[g*HD:(g+1)*HD]):
 *     K[l][g][p] = x_g * (l+1) + 0.01*p;   V[l][g][p] = x_g * wv[l]
 *     s_j = 1 / (1 + K[l][g][j][0]^2),  x_g += sum_j s_j V[l][g][j] / sum_j s_j  (j = 0..p)
 *   logits[v] = sum_d x[d] * out[d][v] + pos_bias * p
 * Weights (float32): emb[V][D], out[D][V], wv[L], pos_bias.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef FAKE_ABI
#define FAKE_ABI 3
#endif
#ifndef FAKE_PRECISION
#define FAKE_PRECISION 0
#endif
#define D (KVH * HD)

typedef struct {
    const float *emb, *out, *wv, *pos_bias;
    float *kv;
    int32_t n_threads;
} ctx_t;

int32_t sparsec_abi_version(void) { return FAKE_ABI; }

/* The order of sparsec/runtime/native.py BUILD_FIELDS; weights: emb, out, wv, pos_bias. */
int32_t sparsec_build_info(int64_t *out, int32_t capacity) {
    const int64_t info[] = {FAKE_ABI, V, D, L, KVH, HD, C, T, FAKE_PRECISION,
                            4 * ((int64_t)V * D * 2 + L + 1), 0 /* float32 KV cache */};
    int32_t n = (int32_t)(sizeof info / sizeof info[0]);
    for (int32_t i = 0; i < n && i < capacity; i++) out[i] = info[i];
    return n;
}

void *sparsec_create(const uint8_t *weights, float *kv_cache, int32_t n_threads) {
#ifdef FAKE_CREATE_FAILS
    return NULL;
#endif
    /* The runtime promises 64-byte aligned buffers; fail loudly if it breaks that. */
    if (!weights || !kv_cache || n_threads < 1 || ((uintptr_t)weights % 64) ||
        ((uintptr_t)kv_cache % 64))
        return NULL;
    ctx_t *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    const float *w = (const float *)weights;
    c->emb = w;
    c->out = c->emb + (size_t)V * D;
    c->wv = c->out + (size_t)D * V;
    c->pos_bias = c->wv + L;
    c->kv = kv_cache;
    c->n_threads = n_threads;
    return c;
}

static float *slot(float *kv, int l, int kind, int g, int pos) {
    return kv + ((((size_t)l * 2 + kind) * KVH + g) * C + pos) * HD;
}

static void run_token(ctx_t *c, float *kv, int32_t t, int32_t p, float *logits) {
    double x[D], ctx[HD];
    for (int d = 0; d < D; d++) x[d] = c->emb[(size_t)t * D + d];
    for (int l = 0; l < L; l++) {
        for (int g = 0; g < KVH; g++) {
            float *k = slot(kv, l, 0, g, p), *v = slot(kv, l, 1, g, p);
            for (int i = 0; i < HD; i++) {
                k[i] = (float)(x[g * HD + i] * (l + 1) + 0.01 * p);
                v[i] = (float)(x[g * HD + i] * c->wv[l]);
            }
            double wsum = 0;
            memset(ctx, 0, sizeof ctx);
            for (int j = 0; j <= p; j++) {
                double kj = slot(kv, l, 0, g, j)[0];
                double s = 1.0 / (1.0 + kj * kj);
                const float *vj = slot(kv, l, 1, g, j);
                wsum += s;
                for (int i = 0; i < HD; i++) ctx[i] += s * vj[i];
            }
            for (int i = 0; i < HD; i++) x[g * HD + i] += ctx[i] / wsum;
        }
    }
    if (!logits) return;
    for (int v = 0; v < V; v++) {
        double acc = (double)c->pos_bias[0] * p;
        for (int d = 0; d < D; d++) acc += x[d] * c->out[(size_t)d * V + v];
        logits[v] = (float)acc;
    }
}

int32_t sparsec_forward(void *ctx, const int32_t *tokens, int32_t n_tokens, int32_t position,
                        float *logits, int32_t all_logits) {
    ctx_t *c = ctx;
    if (n_tokens < 1 || n_tokens > T) return 1;
    if (position < 0 || position + n_tokens > C) return 2;
    for (int32_t s = 0; s < n_tokens; s++) {
        float *row = all_logits ? logits + (size_t)s * V : (s == n_tokens - 1 ? logits : NULL);
        run_token(c, c->kv, tokens[s], position + s, row);
    }
    return 0;
}

int32_t sparsec_forward_rows(void *ctx, const int32_t *tokens, int32_t n_rows,
                             const int32_t *positions, float *const *caches, float *logits,
                             int32_t all_logits) {
    ctx_t *c = ctx;
    if (n_rows < 1 || n_rows > T) return 1;
    for (int32_t s = 0; s < n_rows; s++) {
        if (positions[s] < 0 || positions[s] >= C) return 2;
        if (!caches[s] || ((uintptr_t)caches[s] % 64)) return 3;
    }
    for (int32_t s = 0; s < n_rows; s++) {
        float *row = all_logits ? logits + (size_t)s * V : (s == n_rows - 1 ? logits : NULL);
        run_token(c, caches[s], tokens[s], positions[s], row);
    }
    return 0;
}

void sparsec_destroy(void *ctx) { free(ctx); }
