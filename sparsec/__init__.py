"""sparsec: compile sparse, quantized LLMs into fast native CPU code.

This package root stays import-light: ``from sparsec import runtime`` must work in
a deployment that has only numpy and tokenizers installed.
"""

__version__ = "0.1.0"
