"""Compile's memory (issue 22): a layer is packed with few copies, the packed weights go
to a temporary file instead of RAM, and the graph check copies no weight data."""

from __future__ import annotations

import errno
import re
import tracemalloc

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from sparsec.codegen import emit, linear_pack
from sparsec.codegen.linear import pack_linear
from sparsec.errors import SparsecError
from sparsec.passes import check as check_mod
from sparsec.testing import build_contract_graph, make_tiny_llama


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "fmt, limit", [("dense_f32", 1.1), ("bitmask_f32", 2.2), ("dense_i8", 0.8)]
)
def test_packing_a_layer_copies_it_once_or_twice(fmt, limit):
    """numpy allocations while packing a 2048 x 2048 fp32 layer (16 MiB, 70% zeros): a
    dense layer's result only (its blocks are a view of the weight), a sparse one's
    blocks, streams and result; not the eight copies of byte strings and their joins."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2048, 2048)).astype(np.float32)
    w[rng.random(w.shape) < 0.7] = 0
    peak = _peak_bytes(lambda: pack_linear(w, fmt))
    assert peak < limit * w.nbytes, f"{peak / w.nbytes:.2f}x the weight"


def test_packing_ablation_bytes_parts_cost_more(monkeypatch):
    """Ablation: the blob kept as byte strings (copies of each part, then a join) peaks
    higher, so the test above can fail."""
    w = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    new = _peak_bytes(lambda: pack_linear(w, "dense_f32"))
    original_add = linear_pack._Blob.add
    monkeypatch.setattr(
        linear_pack._Blob, "add", lambda self, raw, zeros=0: original_add(self, bytes(raw), zeros)
    )
    old = _peak_bytes(lambda: pack_linear(w, "dense_f32"))
    assert old > new + 0.9 * w.nbytes


def test_packed_weights_are_file_backed_and_a_full_disk_is_named(monkeypatch, tmp_path):
    blob = emit.WeightsBlob()
    parts = [np.arange(100, dtype=np.float32), np.arange(7, dtype=np.int8)]
    offsets = [blob.add(p) for p in parts]
    data = blob.to_array()
    assert isinstance(data, np.memmap) and not data.flags.writeable
    assert offsets == [0, 448] and data.nbytes == 512
    assert np.array_equal(data[:400].view(np.float32), parts[0])
    assert np.array_equal(data[448:455].view(np.int8), parts[1])

    class FullDisk:
        def write(self, _data):
            raise OSError(errno.ENOSPC, "No space left on device")

    blob.file = FullDisk()
    with pytest.raises(SparsecError, match="No space left on device.*TMPDIR"):
        blob.add(parts[0])


def test_graph_check_copies_no_weight_data(monkeypatch):
    """The ONNX checker sees the weights as typed references, not their bytes; the model
    keeps its tensors (restored after the check)."""
    model, tokenizer = make_tiny_llama(seed=1)
    graph = build_contract_graph(model, tokenizer)
    before = {v.name: v.const_value for v in graph.graph.initializers.values()}
    checked = []
    real = onnx.checker.check_model

    def capture(proto, **kwargs):
        checked.append(
            sum(len(t.raw_data) + 4 * len(t.float_data) for t in proto.graph.initializer)
        )
        return real(proto, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", capture)
    monkeypatch.setattr(check_mod, "CHECKED_DATA_BYTES", 1024)  # the tiny model's are small
    check_mod.check(graph, "tiny", functions=True)
    weights = sum(t.nbytes for t in before.values())
    assert checked[0] < 0.01 * weights
    after = {v.name: v.const_value for v in graph.graph.initializers.values()}
    assert all(after[name] is tensor for name, tensor in before.items())
    # ablation: with every initializer's data checked, the proto carries the weights
    monkeypatch.setattr(check_mod, "CHECKED_DATA_BYTES", 1 << 62)
    check_mod.check(graph, "tiny", functions=True)
    assert checked[1] > 0.99 * weights
    assert isinstance(graph, ir.Model)


@pytest.fixture
def tiny_graph(tmp_path):
    model, tokenizer = make_tiny_llama(seed=1)
    path = tmp_path / "g.onnx"
    ir.save(build_contract_graph(model, tokenizer), path)
    return path


def test_compile_is_refused_up_front_without_the_memory(tiny_graph, tmp_path, monkeypatch):
    from sparsec import resources
    from sparsec.codegen import compile as compile_mod

    def never(*args, **kwargs):
        raise AssertionError("the graph was loaded before the refusal")

    monkeypatch.setattr(resources, "available_memory", lambda: 100 << 20)
    monkeypatch.setattr(compile_mod, "emit_model", never)
    out = tmp_path / "m.so"
    with pytest.raises(SparsecError) as err:
        compile_mod.compile_model(tiny_graph, out, quiet=True)
    assert re.search(
        r"\(\d+ kB of weights\) needs about 5\d\d MB of memory and 105 MB is", str(err.value)
    )
    assert "SPARSEC_NO_RESOURCE_CHECK=1" in str(err.value) and not out.exists()
    # ablation: enough memory, or the check switched off, and it compiles
    monkeypatch.undo()
    monkeypatch.setenv("SPARSEC_NO_RESOURCE_CHECK", "1")
    monkeypatch.setattr(resources, "available_memory", lambda: 100 << 20)
    compile_mod.compile_model(tiny_graph, out, quiet=True, kernels="dense")
    assert out.is_file()


def test_compile_is_refused_up_front_without_the_disk(tiny_graph, tmp_path, monkeypatch):
    import shutil

    from sparsec import resources
    from sparsec.codegen.compile import compile_model

    graph_bytes = tiny_graph.stat().st_size
    real = shutil.disk_usage

    def disk(free):
        def usage(path):
            return real(path)._replace(free=free)

        return usage

    # room for one copy of the packed weights: the temporary file and the output share
    # this filesystem, so it is not enough
    monkeypatch.setattr(resources.shutil, "disk_usage", disk(int(1.5 * graph_bytes)))
    out = tmp_path / "m.so"
    with pytest.raises(SparsecError, match="free and compiling needs about .* for the packed"):
        compile_model(tiny_graph, out, quiet=True)
    assert not out.exists()
    monkeypatch.setattr(resources.shutil, "disk_usage", disk(3 * graph_bytes))  # ablation
    compile_model(tiny_graph, out, quiet=True, kernels="dense")
    assert out.is_file()


def test_external_data_graphs_need_less_memory(tmp_path, monkeypatch):
    """A graph's weights in data files are mapped pages, not a copy: 0.5x its bytes
    instead of 2.4x."""
    import shutil

    from sparsec import resources

    monkeypatch.setattr(resources, "available_memory", lambda: 2 * 10**9)
    real = shutil.disk_usage
    monkeypatch.setattr(resources.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 50))
    resources.check_compile(10**9, "fp32", tmp_path / "m.so", external=True)
    with pytest.raises(SparsecError, match="needs about 2.9 GB of memory and 2.0 GB"):
        resources.check_compile(10**9, "fp32", tmp_path / "m.so", external=False)
