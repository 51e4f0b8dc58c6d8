"""Graphs with their weights in an external data file (protobuf stops at 2 GB): the tiny
model forced to external data goes through export, optimize (its checks under
onnxruntime included) and compile, and computes what the single-file pipeline does;
rewriting an output replaces its data file atomically."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from sparsec import onnx_io, runtime
from sparsec.codegen.compile import compile_model
from sparsec.export import export_model, verify_export
from sparsec.passes import optimize_file


@pytest.fixture
def external(monkeypatch):
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_BYTES", 0)  # every graph: external data


def _pipeline(tiny_model, folder):
    model, tokenizer = tiny_model
    onnx = export_model(model, tokenizer, folder / "m.onnx")
    optimize_file(onnx, folder / "m.opt.onnx")
    compile_model(folder / "m.opt.onnx", folder / "m.so", max_context=64, quiet=True)
    return runtime.load(folder / "m.so")


def test_external_data_pipeline_matches_single_file(tiny_model, tmp_path, monkeypatch):
    ids = list(range(40, 70))
    single = _pipeline(tiny_model, tmp_path).forward(ids)
    assert not onnx_io.data_files(tmp_path / "m.onnx")

    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_BYTES", 0)
    folder = tmp_path / "external"
    folder.mkdir()
    got = _pipeline(tiny_model, folder).forward(ids)
    for name in ("m.onnx", "m.opt.onnx"):
        (data,) = onnx_io.data_files(folder / name)
        proto = onnx.load(str(folder / name), load_external_data=False)
        big = [t for t in proto.graph.initializer if np.prod(t.dims) >= 1024]
        assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
        assert data.stat().st_size >= sum(4 * np.prod(t.dims) for t in big) * 0.9
    np.testing.assert_array_equal(got, single)
    model, _ = tiny_model
    verify_export(folder / "m.onnx", model)  # onnxruntime reads the data file too


def test_rewriting_replaces_the_data_file(tiny_model, tmp_path, external):
    model, tokenizer = tiny_model
    out = tmp_path / "m.onnx"
    export_model(model, tokenizer, out)
    (first,) = onnx_io.data_files(out)
    export_model(model, tokenizer, out)
    (second,) = onnx_io.data_files(out)
    assert second != first and not first.exists()
    assert ir.load(out).graph.initializers  # the new .onnx reads its new data


def test_an_interrupted_write_keeps_the_previous_model(tiny_model, tmp_path, external):
    model, tokenizer = tiny_model
    out = tmp_path / "m.onnx"
    export_model(model, tokenizer, out)
    before = out.read_bytes()
    (data,) = onnx_io.data_files(out)
    graph = ir.load(out)

    def interrupted(model, path, **kwargs):
        (tmp_path / kwargs["external_data"]).write_bytes(b"partial")
        raise KeyboardInterrupt

    import onnx_ir

    original = onnx_ir.save
    onnx_ir.save = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            onnx_io.save_atomic(graph, out)
    finally:
        onnx_ir.save = original
    assert out.read_bytes() == before
    assert onnx_io.data_files(out) == [data]  # the partial data file is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.onnx", data.name])
