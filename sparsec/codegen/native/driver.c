/* sparsec model driver: the ABI v2 entry points of a compiled model (docs/runtime.md).
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
    int32_t position;       /* 44 */
    float *logits;          /* 48 */
    int32_t all_logits;     /* 56 */
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

int32_t sparsec_forward(void *handle, const int32_t *tokens, int32_t n_tokens, int32_t position,
                        float *logits, int32_t all_logits) {
    spc_ctx *ctx = handle;
    if (ctx == NULL || tokens == NULL || logits == NULL) return 3;
    if (n_tokens < 1 || n_tokens > SPC_MAX_TOKENS) return 1;
    if (position < 0 || (int64_t)position + n_tokens > SPC_CAPACITY) return 2;
    for (int32_t i = 0; i < n_tokens; i++)
        if (tokens[i] < 0 || tokens[i] >= SPC_VOCAB) return 4;
    ctx->tokens = tokens;
    ctx->n_tokens = n_tokens;
    ctx->position = position;
    ctx->logits = logits;
    ctx->all_logits = all_logits != 0;
    spc_pool_run(ctx->pool, sparsec_forward_body, ctx);
    return 0;
}

void sparsec_destroy(void *handle) {
    spc_ctx *ctx = handle;
    if (ctx == NULL) return;
    spc_pool_destroy(ctx->pool);
    free(ctx->scratch);
    free(ctx);
}
