/* sparsec native thread pool: one pool per loaded model, one run per forward step.
 *
 * The generated model code calls spc_pool_run once per step with a body function
 * that executes every op of the step, separated by spc_barrier calls. The barrier is
 * therefore on the hot path (dozens per token) and spins; workers idle between runs
 * spin briefly and then sleep on a futex, so a loaded but idle model costs no CPU.
 */
#ifndef SPARSEC_THREADPOOL_H
#define SPARSEC_THREADPOOL_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef void (*spc_task_fn)(void *arg, int32_t tid, int32_t nthreads);
typedef struct spc_pool spc_pool;

/* Starts nthreads-1 worker threads; the caller of spc_pool_run is tid 0.
 * Returns NULL if nthreads < 1 or a thread cannot be created. */
spc_pool *spc_pool_create(int32_t nthreads);

/* Every thread runs fn(arg, tid, nthreads); returns once all of them have returned.
 * Not reentrant: one run at a time per pool, from one caller thread at a time. */
void spc_pool_run(spc_pool *p, spc_task_fn fn, void *arg);

/* Barrier among all nthreads of the current run, called from inside fn. Every thread
 * must call it the same number of times per run. */
void spc_barrier(spc_pool *p, int32_t tid);

/* Stops and joins the workers, frees the pool. NULL is allowed. */
void spc_pool_destroy(spc_pool *p);

int32_t spc_pool_nthreads(const spc_pool *p);

#ifdef __cplusplus
}
#endif

#endif
