"""The sparsec fuzz suite: mutated artifacts, graphs, metadata and arguments.

Run it::

    python -m fuzz --seed 0 --budget-seconds 120          # the CI budget (.ci/run, tests)
    python -m fuzz --seed 1 --budget-seconds 3600 --report fuzz.json   # the long mode
    python -m fuzz --classes graph,cli --cases 20          # 20 cases of two classes
    python -m fuzz --replay artifact:0:17                  # one case again (forked)
    python -m fuzz --replay artifact:0:17 --inline         # ... in this process

The long mode (an hour on 2 cores) runs well over 10,000 cases: thousands of artifact
and runtime-argument cases (the runtime class includes concurrency cases, about one in
eight), several hundred graph cases checked against onnxruntime, and a few hundred CLI
(with signals) and sparsify cases. Budgets are shared between the classes by time
(``SHARE`` in each class's module); ``--cases N`` caps each class.

Case classes (one module each):

- ``artifact`` (artifact_cases): byte flips/overwrites in every region of a compiled
  tiny model.so (ELF header, tables and sections, padding, weights, manifest, trailer),
  truncations, appended bytes, manifest edits re-sealed into consistent-looking files,
  the code of one artifact glued to another's weights and manifest, files replaced
  after loading, odd paths. ``ok`` only if load + forward gives the reference logits.
- ``graph`` (graph_cases): mutated ONNX graphs (metadata, initializers, nodes,
  attributes, padded LM head) and compile options, compiled in the child
  (``kernels="dense"``); if compile accepts, its teacher-forced logits must match
  onnxruntime on the same mutated graph, and onnxruntime must accept it.
- ``runtime`` (runtime_cases): load/generate/stream/forward/chat/encode/rewind/reset/
  close with arguments from pools of odd values; results checked against references
  (greedy tokens, forward logits of a second model); concurrency cases call one Model
  from 2-4 threads.
- ``cli`` (cli_cases): real ``sparsec`` processes with odd arguments and files, SIGINT/
  SIGTERM at random delays; exit codes, one-line errors, outputs intact, no temp files.
- ``sparsify`` (sparsify_cases): ``sparsec sparsify`` with bad arguments on a tiny
  Hugging Face folder: one-line errors before any work.

Every case runs in a forked child (runner.py) and ends as one of ok, error (a clean
one-line SparsecError), crash, hang, traceback, wrong or overwrote; the last five are
failures and make the run exit 1. Cases are deterministic given (class, seed, index):
a failure prints its ``CLASS:SEED:INDEX`` for ``--replay``. Fixtures (the tiny model,
its graphs, compiled artifacts) are built once per sparsec source into
build/fuzz-cache (fuzz/build.py).
"""

from __future__ import annotations

import importlib

CLASSES = {
    "artifact": "fuzz.artifact_cases",
    "graph": "fuzz.graph_cases",
    "runtime": "fuzz.runtime_cases",
    "cli": "fuzz.cli_cases",
    "sparsify": "fuzz.sparsify_cases",
}


def case_module(name: str):
    return importlib.import_module(CLASSES[name])
