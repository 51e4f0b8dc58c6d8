"""The read-bandwidth probe: builds, reads what it is given, rejects what it cannot read."""

from __future__ import annotations

import numpy as np
import pytest

from sparsec.bench.bandwidth import ReadBandwidthProbe, aligned_buffer
from sparsec.errors import SparsecError


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    return ReadBandwidthProbe(cache_dir=tmp_path_factory.mktemp("probe"))


def test_aligned_buffer_is_aligned_written_and_rounded():
    buf = aligned_buffer(1000)
    assert buf.ctypes.data % 64 == 0
    assert buf.nbytes == 1024  # rounded up to the probe's 256-byte step
    assert np.all(buf == 0x5A)  # written, so no page is the shared zero page


@pytest.mark.parametrize("threads", [1, 2])
def test_measure_reports_positive_bandwidth_per_rep(probe, threads):
    bw = probe.measure(threads, nbytes=4 << 20, reps=3)
    assert bw.threads == threads and bw.nbytes == 4 << 20 and bw.reps == 3
    assert 0 < bw.min <= bw.median <= bw.max
    times = probe.time_read(probe.buffer(4 << 20), threads, 4)
    assert times.shape == (4,) and np.all(times > 0)


def test_probe_rejects_unaligned_buffers_and_bad_thread_counts(probe):
    buf = aligned_buffer(4096)
    with pytest.raises(SparsecError, match="64-byte aligned"):
        probe.time_read(buf[1:257], 1, 1)
    with pytest.raises(SparsecError, match="0 threads"):
        probe.time_read(buf, 0, 1)


def test_library_is_cached_by_source_hash(tmp_path):
    ReadBandwidthProbe(cache_dir=tmp_path)
    built = list(tmp_path.glob("read_bandwidth-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    ReadBandwidthProbe(cache_dir=tmp_path)  # a second probe reuses the library
    assert built[0].stat().st_mtime_ns == mtime
