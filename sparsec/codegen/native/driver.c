/* sparsec model driver: the ABI v3 entry points of a compiled model (docs/runtime.md).
 *
 * Everything per token happens in generated code: sparsec_forward fills the context
 * and makes one spc_pool_run over the generated body, which runs every op of the
 * step with barriers between them. This file only owns allocation and argument
 * checks. Model constants come in as -D flags from the compiler:
 *   SPC_ABI, SPC_SCRATCH_BYTES, SPC_MAX_TOKENS, SPC_CAPACITY, SPC_VOCAB, and
 *   SPC_BUILD_INFO: the build constants the runtime checks against the manifest before
 *   any other call, as one array initializer whose order sparsec/runtime/native.py
 *   (BUILD_FIELDS) owns.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "threadpool.h"

/* Field order and offsets are mirrored by sparsec/codegen/emit.py (CTX_FIELDS). */
typedef struct {
    const uint8_t *weights; /* 0 */
    float *kv_cache;        /* 8 */
    spc_pool *pool;         /* 16 */
    uint8_t *scratch;       /* 24 */
    const int32_t *tokens;  /* 32 */
    int32_t n_tokens;       /* 40 */
    int32_t all_logits;     /* 44 */
    float *logits;          /* 48 */
    float *const *caches;   /* 56: per row, the KV cache of its sequence */
    const int32_t *positions; /* 64: per row, its position in that sequence */
    /* sparsec_forward's rows: one sequence (kv_cache) at consecutive positions */
    float *own_caches[SPC_MAX_TOKENS];
    int32_t own_positions[SPC_MAX_TOKENS];
} spc_ctx;

void sparsec_forward_body(void *ctx, int32_t tid, int32_t nthreads);

int32_t sparsec_abi_version(void) { return SPC_ABI; }

static const int64_t spc_build_info[] = SPC_BUILD_INFO;

/* Writes up to `capacity` build constants into `out`; returns how many there are. */
int32_t sparsec_build_info(int64_t *out, int32_t capacity) {
    int32_t n = (int32_t)(sizeof spc_build_info / sizeof spc_build_info[0]);
    for (int32_t i = 0; i < n && i < capacity; i++) out[i] = spc_build_info[i];
    return n;
}

void *sparsec_create(const uint8_t *weights, float *kv_cache, int32_t n_threads) {
    if (weights == NULL || kv_cache == NULL || n_threads < 1) return NULL;
    spc_ctx *ctx = calloc(1, sizeof(spc_ctx));
    if (ctx == NULL) return NULL;
    ctx->scratch = aligned_alloc(64, ((size_t)SPC_SCRATCH_BYTES + 63) / 64 * 64);
    ctx->pool = spc_pool_create(n_threads);
    if (ctx->scratch == NULL || ctx->pool == NULL) {
        free(ctx->scratch);
        spc_pool_destroy(ctx->pool);
        free(ctx);
        return NULL;
    }
    memset(ctx->scratch, 0, SPC_SCRATCH_BYTES);
    ctx->weights = weights;
    ctx->kv_cache = kv_cache;
    return ctx;
}

static int32_t run_rows(spc_ctx *ctx, const int32_t *tokens, int32_t n_rows,
                        const int32_t *positions, float *const *caches, float *logits,
                        int32_t all_logits) {
    ctx->tokens = tokens;
    ctx->n_tokens = n_rows;
    ctx->positions = positions;
    ctx->caches = caches;
    ctx->logits = logits;
    ctx->all_logits = all_logits != 0;
    spc_pool_run(ctx->pool, sparsec_forward_body, ctx);
    return 0;
}

static int32_t check_tokens(const int32_t *tokens, int32_t n) {
    for (int32_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= SPC_VOCAB) return 4;
    return 0;
}

int32_t sparsec_forward(void *handle, const int32_t *tokens, int32_t n_tokens, int32_t position,
                        float *logits, int32_t all_logits) {
    spc_ctx *ctx = handle;
    if (ctx == NULL || tokens == NULL || logits == NULL) return 3;
    if (n_tokens < 1 || n_tokens > SPC_MAX_TOKENS) return 1;
    if (position < 0 || (int64_t)position + n_tokens > SPC_CAPACITY) return 2;
    if (check_tokens(tokens, n_tokens)) return 4;
    for (int32_t i = 0; i < n_tokens; i++) {
        ctx->own_caches[i] = ctx->kv_cache;
        ctx->own_positions[i] = position + i;
    }
    return run_rows(ctx, tokens, n_tokens, ctx->own_positions, ctx->own_caches, logits,
                    all_logits);
}

/* Row i is token tokens[i] of the sequence whose KV cache ([L][2][KVH][C][head_dim]
 * floats, 64-byte aligned) starts at caches[i], at position positions[i]. Rows of
 * different sequences run in one step: every weight is read once for all of them. */
int32_t sparsec_forward_rows(void *handle, const int32_t *tokens, int32_t n_rows,
                             const int32_t *positions, float *const *caches, float *logits,
                             int32_t all_logits) {
    spc_ctx *ctx = handle;
    if (ctx == NULL || tokens == NULL || positions == NULL || caches == NULL || logits == NULL)
        return 3;
    if (n_rows < 1 || n_rows > SPC_MAX_TOKENS) return 1;
    for (int32_t i = 0; i < n_rows; i++) {
        if (positions[i] < 0 || positions[i] >= SPC_CAPACITY) return 2;
        if (caches[i] == NULL) return 3;
        /* Two rows writing one cache slot would race (and one of them would be lost). */
        for (int32_t j = 0; j < i; j++)
            if (caches[j] == caches[i] && positions[j] == positions[i]) return 5;
    }
    if (check_tokens(tokens, n_rows)) return 4;
    return run_rows(ctx, tokens, n_rows, positions, caches, logits, all_logits);
}

void sparsec_destroy(void *handle) {
    spc_ctx *ctx = handle;
    if (ctx == NULL) return;
    spc_pool_destroy(ctx->pool);
    free(ctx->scratch);
    free(ctx);
}
