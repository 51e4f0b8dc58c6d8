"""The runtime needs none of the compiler stack: load and generate with it blocked."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from sparsec import runtime

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED = {"torch", "transformers", "onnx", "onnxruntime", "onnx_ir", "onnxscript",
               "llvmlite", "sparsec.codegen"}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED or name.startswith("sparsec.codegen"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())

    from sparsec import runtime
    import sparsec.runtime.command  # the CLI module stays light too

    m = runtime.load(sys.argv[1])
    r = m.generate("Hello", max_new_tokens=8)
    streamed = "".join(m.generate("Hello", max_new_tokens=8, stream=True))
    chat = m.chat([{"role": "user", "content": "hi"}], max_new_tokens=4)
    loaded = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED
                    or n.startswith("sparsec.codegen"))
    print(json.dumps({"ids": r.token_ids, "text": r.text, "streamed": streamed,
                      "chat": chat.token_ids, "loaded": loaded}))
    """
)


def test_runtime_works_without_compiler_stack(model_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    with runtime.load(model_path) as m:
        expected = m.generate("Hello", max_new_tokens=8)
        chat = m.chat([{"role": "user", "content": "hi"}], max_new_tokens=4)
    assert got["ids"] == expected.token_ids
    assert got["text"] == got["streamed"] == expected.text
    assert got["chat"] == chat.token_ids
    assert got["loaded"] == []
