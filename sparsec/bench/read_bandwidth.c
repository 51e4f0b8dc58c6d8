/* Read-bandwidth probe: the memory ceiling that decode speeds are compared against.
 *
 * sparsec_read_bandwidth streams `bytes` of `buf` on `nthreads` threads (thread t reads
 * the t-th contiguous slice) with 512-bit loads, `reps` times, and stores each
 * repetition's wall time in `times`. The loads feed four XOR chains whose result goes
 * to a volatile sink, so the compiler cannot drop them and no FP latency limits them:
 * the loop is bound by how fast memory delivers bytes, like a decode step's weight
 * stream. The threads start together on a spin barrier (yielding after a while, so a
 * descheduled peer on a busy machine does not stall the others) and are created once
 * per call. Not part of a model library.
 */
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

struct probe_job {
    const uint8_t *buf;
    size_t bytes;
    int nthreads, reps;
    atomic_int arrived;
    atomic_int generation;
    atomic_int go; /* 0 wait, 1 run, -1 abort (a thread could not be started) */
    double *times;
};

static volatile uint64_t sink;

static void barrier(struct probe_job *job) {
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

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* XOR of every 64-byte line in [p, p + n); n is a multiple of 256. */
static uint64_t read_slice(const uint8_t *p, size_t n) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < n; i += 256) {
        a0 = _mm512_xor_si512(a0, _mm512_load_si512((const void *)(p + i)));
        a1 = _mm512_xor_si512(a1, _mm512_load_si512((const void *)(p + i + 64)));
        a2 = _mm512_xor_si512(a2, _mm512_load_si512((const void *)(p + i + 128)));
        a3 = _mm512_xor_si512(a3, _mm512_load_si512((const void *)(p + i + 192)));
    }
    __m512i a = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
    return (uint64_t)_mm512_reduce_add_epi64(a);
}

static void run(struct probe_job *job, int tid) {
    size_t lines = job->bytes / 256;
    size_t lo = lines * (size_t)tid / (size_t)job->nthreads;
    size_t hi = lines * (size_t)(tid + 1) / (size_t)job->nthreads;
    uint64_t acc = 0;
    for (int r = 0; r < job->reps; r++) {
        barrier(job);
        double t0 = now();
        acc ^= read_slice(job->buf + lo * 256, (hi - lo) * 256);
        barrier(job);
        if (tid == 0) job->times[r] = now() - t0;
    }
    sink = acc;
}

struct worker_arg {
    struct probe_job *job;
    int tid;
};

static void *worker(void *p) {
    struct worker_arg *w = p;
    int go;
    while ((go = atomic_load_explicit(&w->job->go, memory_order_acquire)) == 0) sched_yield();
    if (go > 0) run(w->job, w->tid);
    return 0;
}

/* buf: 64-byte aligned; bytes: a multiple of 256. Returns 0, or -1 on bad arguments or
 * when a thread cannot be started. */
int sparsec_read_bandwidth(const void *buf, size_t bytes, int nthreads, int reps,
                           double *times) {
    enum { MAX_THREADS = 64 };
    if (nthreads < 1 || nthreads > MAX_THREADS || reps < 1 || bytes % 256 != 0 ||
        ((uintptr_t)buf & 63) != 0)
        return -1;
    struct probe_job job = {(const uint8_t *)buf, bytes, nthreads, reps, 0, 0, 0, times};
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
