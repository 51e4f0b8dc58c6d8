/* Times sequences of generated linear kernels on real threads (autotuning, benchmarks).
 *
 * Each repetition runs every call of the sequence on `nthreads` threads (thread t
 * passes tid = t), with a spin barrier after each call as the model's step does.
 * Thread 0 records the wall time of each repetition. Not part of a model library.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

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
    const struct sparsec_call *calls;
    int ncalls, n_tokens, nthreads, reps;
    atomic_int arrived;
    atomic_int generation;
    atomic_int go; /* 0: wait, 1: run, -1: abort (a thread failed to start) */
    double *times;
};

static void barrier(struct timer_job *job) {
    int gen = atomic_load_explicit(&job->generation, memory_order_acquire);
    if (atomic_fetch_add_explicit(&job->arrived, 1, memory_order_acq_rel) == job->nthreads - 1) {
        atomic_store_explicit(&job->arrived, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&job->generation, 1, memory_order_release);
    } else {
        /* Spin briefly, then yield: on a loaded machine the other thread may be
         * descheduled and pure spinning would convoy. */
        for (int spins = 0; atomic_load_explicit(&job->generation, memory_order_acquire) == gen;
             spins++) {
            if (spins < 4096) {
                __builtin_ia32_pause();
            } else {
                sched_yield();
            }
        }
    }
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void run(struct timer_job *job, int tid) {
    for (int r = 0; r < job->reps; r++) {
        barrier(job);
        double t0 = now();
        for (int c = 0; c < job->ncalls; c++) {
            const struct sparsec_call *k = &job->calls[c];
            if (k->kind == 0) {
                ((fp32_kernel)k->fn)(k->a[0], k->a[1], k->a[2], job->n_tokens, tid, job->nthreads);
            } else {
                ((int8_kernel)k->fn)(k->a[0], k->a[1], k->a[2], k->a[3], job->n_tokens, tid,
                                     job->nthreads);
            }
            barrier(job);
        }
        if (tid == 0) job->times[r] = now() - t0;
    }
}

struct worker_arg {
    struct timer_job *job;
    int tid;
};

static void *worker(void *p) {
    struct worker_arg *w = p;
    int go;
    while ((go = atomic_load_explicit(&w->job->go, memory_order_acquire)) == 0) sched_yield();
    if (go > 0) run(w->job, w->tid);
    return 0;
}

/* Returns 0 on success, -1 if a thread could not be started. */
int sparsec_time_calls(const struct sparsec_call *calls, int ncalls, int n_tokens, int nthreads,
                       int reps, double *times) {
    enum { MAX_THREADS = 64 };
    if (nthreads < 1 || nthreads > MAX_THREADS) return -1;
    struct timer_job job = {calls, ncalls, n_tokens, nthreads, reps, 0, 0, 0, times};
    pthread_t threads[MAX_THREADS];
    struct worker_arg args[MAX_THREADS];
    int started = 1;
    for (; started < nthreads; started++) {
        args[started].job = &job;
        args[started].tid = started;
        if (pthread_create(&threads[started], 0, worker, &args[started]) != 0) break;
    }
    int ok = started == nthreads;
    atomic_store_explicit(&job.go, ok ? 1 : -1, memory_order_release);
    if (ok) run(&job, 0);
    for (int t = 1; t < started; t++) pthread_join(threads[t], 0);
    return ok ? 0 : -1;
}
