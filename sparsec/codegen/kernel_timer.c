/* Times sequences of generated linear kernels on real threads (autotuning, benchmarks).
 *
 * Each repetition runs every call of the sequence on `nthreads` threads (thread t
 * passes tid = t), with a spin barrier after each call as the model's step does.
 * Thread 0 records the wall time of each repetition. Not part of a model library.
 */
#include <stdint.h>

#include "native/timed_threads.h"

typedef void (*fp32_kernel)(const void *, const void *, void *, int32_t, int32_t, int32_t);
typedef void (*int8_kernel)(const void *, const void *, const void *, void *, int32_t, int32_t,
                            int32_t);

/* kind 0: fn(a0, a1, a2, n, tid, nt) (fp32 linear); kind 1: fn(a0, a1, a2, a3, n, tid, nt). */
struct sparsec_call {
    void *fn;
    int64_t kind;
    void *a[4];
};

struct timer_job {
    struct spc_timed base; /* first: the harness passes &base */
    const struct sparsec_call *calls;
    int ncalls, n_tokens, reps;
    double *times;
};

static void run(struct spc_timed *base, int tid) {
    struct timer_job *job = (struct timer_job *)base;
    int nthreads = base->nthreads;
    for (int r = 0; r < job->reps; r++) {
        spc_timed_barrier(base);
        double t0 = spc_timed_now();
        for (int c = 0; c < job->ncalls; c++) {
            const struct sparsec_call *k = &job->calls[c];
            if (k->kind == 0) {
                ((fp32_kernel)k->fn)(k->a[0], k->a[1], k->a[2], job->n_tokens, tid, nthreads);
            } else {
                ((int8_kernel)k->fn)(k->a[0], k->a[1], k->a[2], k->a[3], job->n_tokens, tid,
                                     nthreads);
            }
            spc_timed_barrier(base);
        }
        if (tid == 0) job->times[r] = spc_timed_now() - t0;
    }
}

/* Returns 0 on success, -1 if a thread could not be started. */
int sparsec_time_calls(const struct sparsec_call *calls, int ncalls, int n_tokens, int nthreads,
                       int reps, double *times) {
    struct timer_job job = {.calls = calls, .ncalls = ncalls, .n_tokens = n_tokens,
                            .reps = reps, .times = times};
    job.base.nthreads = nthreads;
    job.base.body = run;
    return spc_timed_run(&job.base);
}
