/* sparsec native thread pool (see threadpool.h for the contract).
 *
 * Dispatch: the caller publishes (fn, arg), bumps `generation` and wakes sleepers;
 * workers notice the new generation, run fn, and decrement `pending`; the caller
 * runs its own share as tid 0 and then spins until `pending` reaches 0. Because a
 * run only returns once every worker has finished, a worker can never miss a
 * generation.
 *
 * Idle workers spin on `generation` for up to IDLE_SPIN_NS (the gap between decode
 * steps is usually shorter: Python only samples a token), then sleep on it as a
 * futex. `sleepers` tells the caller whether a FUTEX_WAKE syscall is needed; the
 * increment of `sleepers` and the bump of `generation` are both seq_cst, so either
 * the sleeper sees the new generation or the caller sees the sleeper.
 *
 * Barrier: sense-reversing on one counter and one flag, each on its own cache line.
 * Waiters spin with pause and start yielding after a while, which keeps an
 * oversubscribed machine (more threads than free cores) making progress.
 */
#define _GNU_SOURCE
#include "threadpool.h"

#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define spc_cpu_relax() _mm_pause()
#else
#define spc_cpu_relax() __asm__ __volatile__("" ::: "memory")
#endif

#define CACHE_LINE 64
#define IDLE_SPIN_NS 200000L    /* workers spin this long for the next run, then sleep */
#define SPINS_BEFORE_YIELD 512 /* barrier / completion waits yield the core after this */

typedef struct {
    alignas(CACHE_LINE) int32_t sense; /* written only by its own thread */
} spc_local;

struct spc_pool {
    int32_t nthreads;
    pthread_t *threads;
    spc_local *local;

    /* Run dispatch, written by the caller before the generation bump. */
    spc_task_fn fn;
    void *arg;
    int shutdown;

    alignas(CACHE_LINE) _Atomic uint32_t generation; /* futex word */
    _Atomic int32_t sleepers;
    alignas(CACHE_LINE) _Atomic int32_t pending; /* workers still inside fn */
    alignas(CACHE_LINE) _Atomic int32_t bar_count;
    alignas(CACHE_LINE) _Atomic int32_t bar_sense;
};

typedef struct {
    spc_pool *pool;
    int32_t tid;
} spc_worker_start;

static long futex_wait(_Atomic uint32_t *addr, uint32_t expected) {
    return syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}

static void futex_wake_all(_Atomic uint32_t *addr) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* Wait until the generation differs from `seen`; returns the new generation. */
static uint32_t wait_for_generation(spc_pool *p, uint32_t seen) {
    uint32_t g;
    long deadline = now_ns() + IDLE_SPIN_NS;
    for (;;) {
        for (int i = 0; i < 64; i++) {
            g = atomic_load_explicit(&p->generation, memory_order_acquire);
            if (g != seen) return g;
            spc_cpu_relax();
        }
        if (now_ns() > deadline) break;
    }
    atomic_fetch_add_explicit(&p->sleepers, 1, memory_order_seq_cst);
    while ((g = atomic_load_explicit(&p->generation, memory_order_seq_cst)) == seen)
        futex_wait(&p->generation, seen);
    atomic_fetch_sub_explicit(&p->sleepers, 1, memory_order_relaxed);
    return g;
}

static void *worker_main(void *raw) {
    spc_worker_start start = *(spc_worker_start *)raw;
    free(raw);
    spc_pool *p = start.pool;
    uint32_t seen = 0;
    for (;;) {
        seen = wait_for_generation(p, seen);
        if (p->shutdown) break;
        p->fn(p->arg, start.tid, p->nthreads);
        atomic_fetch_sub_explicit(&p->pending, 1, memory_order_release);
    }
    return NULL;
}

static void spin_wait_step(int *spins) {
    if (++*spins < SPINS_BEFORE_YIELD)
        spc_cpu_relax();
    else
        sched_yield();
}

spc_pool *spc_pool_create(int32_t nthreads) {
    if (nthreads < 1) return NULL;
    spc_pool *p = aligned_alloc(CACHE_LINE, (sizeof(spc_pool) + CACHE_LINE - 1) / CACHE_LINE * CACHE_LINE);
    if (!p) return NULL;
    memset(p, 0, sizeof *p);
    p->nthreads = nthreads;
    p->local = aligned_alloc(CACHE_LINE, sizeof(spc_local) * (size_t)nthreads);
    p->threads = calloc((size_t)nthreads, sizeof(pthread_t));
    if (!p->local || !p->threads) {
        free(p->local);
        free(p->threads);
        free(p);
        return NULL;
    }
    memset(p->local, 0, sizeof(spc_local) * (size_t)nthreads);
    atomic_init(&p->generation, 0);
    atomic_init(&p->sleepers, 0);
    atomic_init(&p->pending, 0);
    atomic_init(&p->bar_count, 0);
    atomic_init(&p->bar_sense, 0);

    for (int32_t t = 1; t < nthreads; t++) {
        spc_worker_start *start = malloc(sizeof *start);
        if (start) {
            start->pool = p;
            start->tid = t;
        }
        if (!start || pthread_create(&p->threads[t], NULL, worker_main, start) != 0) {
            free(start);
            /* Stop the workers that did start, then fail. */
            int32_t started = t - 1;
            p->nthreads = started + 1;
            spc_pool_destroy(p);
            return NULL;
        }
    }
    return p;
}

void spc_pool_run(spc_pool *p, spc_task_fn fn, void *arg) {
    int32_t n = p->nthreads;
    if (n == 1) {
        fn(arg, 0, 1);
        return;
    }
    p->fn = fn;
    p->arg = arg;
    atomic_store_explicit(&p->pending, n - 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&p->generation, 1, memory_order_seq_cst);
    if (atomic_load_explicit(&p->sleepers, memory_order_seq_cst) > 0) futex_wake_all(&p->generation);

    fn(arg, 0, n);

    int spins = 0;
    while (atomic_load_explicit(&p->pending, memory_order_acquire) != 0) spin_wait_step(&spins);
}

void spc_barrier(spc_pool *p, int32_t tid) {
    int32_t n = p->nthreads;
    if (n == 1) return;
    int32_t sense = !p->local[tid].sense;
    p->local[tid].sense = sense;
    if (atomic_fetch_add_explicit(&p->bar_count, 1, memory_order_acq_rel) == n - 1) {
        /* Last to arrive: reset for the next barrier, then release everyone. */
        atomic_store_explicit(&p->bar_count, 0, memory_order_relaxed);
        atomic_store_explicit(&p->bar_sense, sense, memory_order_release);
    } else {
        int spins = 0;
        while (atomic_load_explicit(&p->bar_sense, memory_order_acquire) != sense)
            spin_wait_step(&spins);
    }
}

void spc_pool_destroy(spc_pool *p) {
    if (!p) return;
    if (p->nthreads > 1) {
        p->shutdown = 1;
        atomic_fetch_add_explicit(&p->generation, 1, memory_order_seq_cst);
        futex_wake_all(&p->generation);
        for (int32_t t = 1; t < p->nthreads; t++) pthread_join(p->threads[t], NULL);
    }
    free(p->threads);
    free(p->local);
    free(p);
}

int32_t spc_pool_nthreads(const spc_pool *p) { return p->nthreads; }
