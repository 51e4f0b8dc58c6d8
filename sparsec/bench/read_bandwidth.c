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
#include <stdint.h>

#include "../codegen/native/timed_threads.h"

struct probe_job {
    struct spc_timed base; /* first: the harness passes &base */
    const uint8_t *buf;
    size_t bytes;
    int reps;
    double *times;
};

static volatile uint64_t sink;

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

static void run(struct spc_timed *base, int tid) {
    struct probe_job *job = (struct probe_job *)base;
    size_t lines = job->bytes / 256, n = (size_t)base->nthreads;
    size_t lo = lines * (size_t)tid / n, hi = lines * (size_t)(tid + 1) / n;
    uint64_t acc = 0;
    for (int r = 0; r < job->reps; r++) {
        spc_timed_barrier(base);
        double t0 = spc_timed_now();
        acc ^= read_slice(job->buf + lo * 256, (hi - lo) * 256);
        spc_timed_barrier(base);
        if (tid == 0) job->times[r] = spc_timed_now() - t0;
    }
    sink = acc;
}

/* buf: 64-byte aligned; bytes: a multiple of 256. Returns 0, or -1 on bad arguments or
 * when a thread cannot be started. */
int sparsec_read_bandwidth(const void *buf, size_t bytes, int nthreads, int reps,
                           double *times) {
    if (reps < 1 || bytes % 256 != 0 || ((uintptr_t)buf & 63) != 0) return -1;
    struct probe_job job = {.buf = (const uint8_t *)buf, .bytes = bytes, .reps = reps,
                            .times = times};
    job.base.nthreads = nthreads;
    job.base.body = run;
    return spc_timed_run(&job.base);
}
