"""The native thread pool: work distribution, barriers, idle sleep, clean shutdown.

A small C task (compiled together with threadpool.c) does the multi-threaded work;
Python drives many runs through ctypes and checks what every thread recorded.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import numpy as np
import pytest

from sparsec.codegen import target

NATIVE = Path(__file__).resolve().parents[2] / "sparsec" / "codegen" / "native"

# check_task: every round each thread publishes a value, waits at a barrier, checks
# that it sees every other thread's value of this round, and waits again before the
# next round overwrites them. sum_task: a strided share of a reduction per thread.
TASK_C = r"""
#include <stdint.h>
#include "threadpool.h"

typedef struct {
    spc_pool *pool;
    int32_t rounds;
    int32_t run;
    volatile int64_t *slots;  /* [nthreads] */
    int64_t *errors;          /* [nthreads] */
    int64_t *calls;           /* [nthreads] */
    int32_t *seen_nthreads;   /* [nthreads] */
} check_arg;

static void check_task(void *raw, int32_t tid, int32_t n) {
    check_arg *a = raw;
    a->calls[tid] += 1;
    a->seen_nthreads[tid] = n;
    for (int32_t r = 0; r < a->rounds; r++) {
        int64_t base = ((int64_t)a->run * a->rounds + r) * 1000;
        a->slots[tid] = base + tid;
        spc_barrier(a->pool, tid);
        for (int32_t t = 0; t < n; t++)
            if (a->slots[t] != base + t) a->errors[tid] += 1;
        spc_barrier(a->pool, tid);
    }
}

int64_t run_checks(spc_pool *p, int32_t runs, int32_t rounds, int64_t *slots,
                   int64_t *errors, int64_t *calls, int32_t *seen_nthreads) {
    check_arg a = {p, rounds, 0, slots, errors, calls, seen_nthreads};
    for (int32_t r = 0; r < runs; r++) {
        a.run = r;
        spc_pool_run(p, check_task, &a);
    }
    return 0;
}

typedef struct {
    const int64_t *values;
    int64_t count;
    int64_t *partial;   /* [nthreads] */
    int64_t *touched;   /* [count]: how many threads handled each index */
} sum_arg;

static void sum_task(void *raw, int32_t tid, int32_t n) {
    sum_arg *a = raw;
    int64_t s = 0;
    for (int64_t i = tid; i < a->count; i += n) {
        s += a->values[i];
        a->touched[i] += 1;
    }
    a->partial[tid] = s;
}

void run_sum(spc_pool *p, const int64_t *values, int64_t count, int64_t *partial,
             int64_t *touched) {
    sum_arg a = {values, count, partial, touched};
    spc_pool_run(p, sum_task, &a);
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pool")
    task = tmp / "task.c"
    task.write_text(TASK_C)
    out = target.link_shared(
        [], [NATIVE / "threadpool.c", task], tmp / "pool.so", extra_flags=[f"-I{NATIVE}"]
    )
    so = ctypes.CDLL(str(out))
    so.spc_pool_create.restype = ctypes.c_void_p
    so.spc_pool_create.argtypes = [ctypes.c_int32]
    so.spc_pool_destroy.argtypes = [ctypes.c_void_p]
    so.spc_pool_nthreads.argtypes = [ctypes.c_void_p]
    so.spc_pool_nthreads.restype = ctypes.c_int32
    so.run_checks.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32] + [
        ctypes.c_void_p
    ] * 4
    so.run_checks.restype = ctypes.c_int64
    so.run_sum.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 2
    return so


def _os_threads() -> list[int]:
    return sorted(int(t) for t in os.listdir("/proc/self/task"))


def _thread_state(tid: int) -> str:
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("nthreads", [1, 2, 3])
def test_many_runs_and_barriers(lib, nthreads):
    pool = lib.spc_pool_create(nthreads)
    assert pool
    try:
        assert lib.spc_pool_nthreads(pool) == nthreads
        runs, rounds = 300, 20
        slots = np.zeros(nthreads, np.int64)
        errors = np.zeros(nthreads, np.int64)
        calls = np.zeros(nthreads, np.int64)
        seen = np.zeros(nthreads, np.int32)
        lib.run_checks(pool, runs, rounds, slots.ctypes.data, errors.ctypes.data,
                       calls.ctypes.data, seen.ctypes.data)  # fmt: skip
        # Every thread ran every run exactly once, saw all peers at every barrier.
        np.testing.assert_array_equal(calls, runs)
        np.testing.assert_array_equal(errors, 0)
        np.testing.assert_array_equal(seen, nthreads)
    finally:
        lib.spc_pool_destroy(pool)


@pytest.mark.parametrize("nthreads", [1, 2, 3])
def test_work_distribution_is_disjoint_and_complete(lib, nthreads):
    pool = lib.spc_pool_create(nthreads)
    try:
        values = np.random.default_rng(nthreads).integers(-1000, 1000, 1001).astype(np.int64)
        for _ in range(5):
            partial = np.zeros(nthreads, np.int64)
            touched = np.zeros(values.size, np.int64)
            lib.run_sum(pool, values.ctypes.data, values.size, partial.ctypes.data,
                        touched.ctypes.data)  # fmt: skip
            np.testing.assert_array_equal(touched, 1)
            assert partial.sum() == values.sum()
    finally:
        lib.spc_pool_destroy(pool)


def test_invalid_thread_count_returns_null(lib):
    assert not lib.spc_pool_create(0)
    assert not lib.spc_pool_create(-2)
    lib.spc_pool_destroy(None)  # allowed, does nothing


def test_destroy_joins_workers(lib):
    before = _os_threads()
    pool = lib.spc_pool_create(3)
    assert len(_os_threads()) == len(before) + 2
    calls = np.zeros(3, np.int64)
    scratch = [np.zeros(3, np.int64), np.zeros(3, np.int64), np.zeros(3, np.int32)]
    lib.run_checks(pool, 3, 2, scratch[0].ctypes.data, scratch[1].ctypes.data,
                   calls.ctypes.data, scratch[2].ctypes.data)  # fmt: skip
    lib.spc_pool_destroy(pool)
    assert _os_threads() == before


def test_idle_workers_sleep(lib):
    """After a run, idle workers block in the kernel instead of spinning on a core."""
    before = set(_os_threads())
    pool = lib.spc_pool_create(3)
    try:
        workers = sorted(set(_os_threads()) - before)
        assert len(workers) == 2
        scratch = [np.zeros(3, np.int64) for _ in range(3)] + [np.zeros(3, np.int32)]
        lib.run_checks(pool, 10, 2, *(a.ctypes.data for a in scratch))
        # The spin phase lasts 0.2 ms; give the scheduler ample time to let them sleep.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if all(_thread_state(w) == "S" for w in workers):
                break
            time.sleep(0.02)
        assert [_thread_state(w) for w in workers] == ["S", "S"]
        # And they wake up for the next run.
        calls = np.zeros(3, np.int64)
        lib.run_checks(pool, 2, 2, scratch[0].ctypes.data, scratch[1].ctypes.data,
                       calls.ctypes.data, scratch[3].ctypes.data)  # fmt: skip
        np.testing.assert_array_equal(calls, 2)
    finally:
        lib.spc_pool_destroy(pool)
