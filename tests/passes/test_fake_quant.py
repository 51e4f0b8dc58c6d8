"""fake_quant pass: sparsify's per-token fake quantization, as torch dynamo exports it,
becomes PerTokenFakeQuant with identical outputs."""

from __future__ import annotations

import warnings

import numpy as np
import onnx_ir as ir
import pytest
from passes_helpers import ops, run

from sparsec.passes import reference
from sparsec.passes.cleanup import CleanupPass
from sparsec.passes.fake_quant import FakeQuantPass


@pytest.fixture(scope="module")
def fake_quant_export(tmp_path_factory):
    import torch

    from sparsec.sparsify.quant import fake_quant_per_token

    class Quantized(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(16, 8, bias=False)

        def forward(self, x):
            return self.linear(fake_quant_per_token(x))

    torch.manual_seed(0)
    dims = ({0: torch.export.Dim("b"), 1: torch.export.Dim("s")},)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            Quantized().eval(), (torch.randn(2, 3, 16),), dynamo=True, dynamic_shapes=dims
        )
    path = tmp_path_factory.mktemp("fq") / "fq.onnx"
    ir.save(program.model, path)
    return path


def test_exported_fake_quant_fuses_exactly(fake_quant_export):
    model = ir.load(fake_quant_export)
    x = np.random.default_rng(0).standard_normal((2, 3, 16), dtype=np.float32) * 4
    x[1, 2] = 0.0  # an all-zero token
    name = model.graph.inputs[0].name
    before = run(model, {name: x})
    CleanupPass()(model)
    p = FakeQuantPass()
    p(model)
    assert p.report.fused == {"PerTokenFakeQuant": 1}
    assert set(ops(model)) == {"sparsec.PerTokenFakeQuant", "MatMul"}
    after = run(model, {name: x})
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    w = next(v for v in model.graph.initializers.values()).const_value.numpy()
    np.testing.assert_allclose(
        after[next(iter(after))], reference.per_token_fake_quant(x) @ w, rtol=1e-5, atol=1e-6
    )
