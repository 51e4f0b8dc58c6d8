/* Timing harness shared by the kernel timer (codegen/kernel_timer.c) and the read-
 * bandwidth probe (bench/read_bandwidth.c): run a job on N threads that start together
 * and meet at a spin barrier. Not part of a model library.
 *
 * A job embeds `struct spc_timed` first; spc_timed_run starts threads 1..N-1, runs the
 * body on the calling thread as tid 0, and joins them. The barrier spins briefly, then
 * yields: on a loaded machine a peer may be descheduled and pure spinning would convoy.
 */
#ifndef SPARSEC_TIMED_THREADS_H
#define SPARSEC_TIMED_THREADS_H

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

enum { SPC_TIMED_MAX_THREADS = 64 };

struct spc_timed {
    int nthreads;
    atomic_int arrived;
    atomic_int generation;
    atomic_int go; /* 0: wait, 1: run, -1: abort (a thread failed to start) */
    void (*body)(struct spc_timed *job, int tid);
};

static void spc_timed_barrier(struct spc_timed *job) {
    int gen = atomic_load_explicit(&job->generation, memory_order_acquire);
    if (atomic_fetch_add_explicit(&job->arrived, 1, memory_order_acq_rel) == job->nthreads - 1) {
        atomic_store_explicit(&job->arrived, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&job->generation, 1, memory_order_release);
    } else {
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

static double spc_timed_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

struct spc_timed_worker {
    struct spc_timed *job;
    int tid;
};

static void *spc_timed_worker_main(void *p) {
    struct spc_timed_worker *w = p;
    int go;
    while ((go = atomic_load_explicit(&w->job->go, memory_order_acquire)) == 0) sched_yield();
    if (go > 0) w->job->body(w->job, w->tid);
    return 0;
}

/* Runs job->body on job->nthreads threads; 0 on success, -1 if nthreads is out of range
 * or a thread could not be started (then the body does not run at all). */
static int spc_timed_run(struct spc_timed *job) {
    int n = job->nthreads;
    if (n < 1 || n > SPC_TIMED_MAX_THREADS) return -1;
    atomic_init(&job->arrived, 0);
    atomic_init(&job->generation, 0);
    atomic_init(&job->go, 0);
    pthread_t threads[SPC_TIMED_MAX_THREADS];
    struct spc_timed_worker args[SPC_TIMED_MAX_THREADS];
    int started = 1;
    for (; started < n; started++) {
        args[started].job = job;
        args[started].tid = started;
        if (pthread_create(&threads[started], 0, spc_timed_worker_main, &args[started]) != 0)
            break;
    }
    int ok = started == n;
    atomic_store_explicit(&job->go, ok ? 1 : -1, memory_order_release);
    if (ok) job->body(job, 0);
    for (int t = 1; t < started; t++) pthread_join(threads[t], 0);
    return ok ? 0 : -1;
}

#endif
