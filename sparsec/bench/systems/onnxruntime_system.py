"""onnxruntime on the variant's exported ONNX graph (fp32), or on onnxruntime's own
dynamic int8 quantization of it (``quantize_dynamic``: int8 weights, int8 activations
quantized per call), with the KV cache kept in OrtValues between steps."""

from __future__ import annotations

import numpy as np

from sparsec import contract
from sparsec.bench import variants
from sparsec.bench.systems.base import System

_ITEMSIZE = {1: 4, 2: 1, 3: 1, 6: 4, 7: 8, 10: 2, 11: 8, 16: 2}  # onnx TensorProto types


class OnnxRuntimeSystem(System):
    engine = "onnxruntime"

    def __init__(self, variant, precision: str):
        label = "fp32" if precision == "fp32" else "dynamic int8"
        super().__init__(variant, f"onnxruntime {label}")
        import onnxruntime

        self.version = onnxruntime.__version__
        self.precision = precision
        self.weights_format = "fp32" if precision == "fp32" else "int8 (quantize_dynamic)"
        self.session = None
        cfg = variant.model.config
        self.n_layers = cfg.num_hidden_layers
        self.kv_shape = (
            1,
            cfg.num_key_value_heads,
            0,
            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        )
        self._weight_bytes = 0

    def prepare(self) -> None:
        path = (
            variants.exported_onnx(self.variant)
            if self.precision == "fp32"
            else variants.onnx_dynamic_int8(self.variant)
        )
        self.artifact = str(path)
        self._weight_bytes = _matmul_weight_bytes(path, self.variant.config.hidden_size)

    def _load(self, threads: int) -> None:
        import onnxruntime as ort

        self.close()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(self.artifact, opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def close(self) -> None:
        self.session = None
        self.threads = None

    def _reset(self) -> None:
        from onnxruntime import OrtValue

        empty = np.zeros(self.kv_shape, np.float32)
        self.past = {}
        for i in range(self.n_layers):
            self.past[contract.past_key(i)] = OrtValue.ortvalue_from_numpy(empty)
            self.past[contract.past_value(i)] = OrtValue.ortvalue_from_numpy(empty)
        self.position = 0

    def _forward_last(self, ids) -> np.ndarray:
        from onnxruntime import OrtValue

        n = len(ids)
        p = self.position
        feeds = {
            contract.INPUT_IDS: OrtValue.ortvalue_from_numpy(np.array([ids], np.int64)),
            contract.ATTENTION_MASK: OrtValue.ortvalue_from_numpy(np.ones((1, p + n), np.int64)),
            contract.POSITION_IDS: OrtValue.ortvalue_from_numpy(
                np.arange(p, p + n, dtype=np.int64)[None]
            ),
            **self.past,
        }
        out = dict(
            zip(self.outputs, self.session.run_with_ort_values(self.outputs, feeds), strict=True)
        )
        for i in range(self.n_layers):
            self.past[contract.past_key(i)] = out[contract.present_key(i)]
            self.past[contract.past_value(i)] = out[contract.present_value(i)]
        self.position += n
        return out[contract.LOGITS].numpy()[0, -1]

    def weight_bytes_per_token(self) -> int:
        return self._weight_bytes


def _matmul_weight_bytes(path, hidden: int) -> int:
    """Bytes of the initializers that feed matrix products (dense, every step) plus one
    embedding row (a Gather reads one row per token)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}

    def source_init(name: str, depth: int = 0):
        # through Transpose/Cast/DequantizeLinear-like single-input wrappers
        if name in inits:
            return name
        node = producers.get(name)
        if node is None or depth > 3 or not node.input:
            return None
        return source_init(node.input[0], depth + 1)

    matmul_ops = {
        "MatMul",
        "Gemm",
        "MatMulInteger",
        "DynamicQuantizeMatMul",
        "MatMulNBits",
        "FusedMatMul",
    }
    used: set[str] = set()
    for node in graph.node:
        if node.op_type in matmul_ops:
            for inp in node.input[:2]:
                src = source_init(inp)
                if src and len(inits[src].dims) == 2:
                    used.add(src)
    total = 0
    for name in used:
        t = inits[name]
        total += int(np.prod(t.dims)) * _ITEMSIZE.get(t.data_type, 4)
    return total + 4 * hidden
