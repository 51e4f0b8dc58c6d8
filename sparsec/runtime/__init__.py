"""The sparsec runtime: load a compiled ``model.so`` and generate text with it.

    from sparsec import runtime
    m = runtime.load("model.so")
    print(m.generate("Once upon a time", max_new_tokens=64).text)

Needs only numpy, tokenizers and ctypes (plus jinja2 for chat templates): never the
compiler stack. See docs/runtime.md for the artifact format and the native ABI.
"""

from sparsec.runtime.generation import Generation, GenerationStats, TextStream
from sparsec.runtime.model import Model, load

__all__ = ["Generation", "GenerationStats", "Model", "TextStream", "load"]
