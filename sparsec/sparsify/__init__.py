"""Sparsification: SparseGPT one-shot pruning, SquareHead distillation, W8A8 INT8.

Entry point: ``sparsec.sparsify.pipeline.sparsify`` (CLI ``sparsec sparsify``); the
building blocks live in ``sparsegpt``, ``prune``, ``squarehead``, ``train``, ``quant``.
This package root stays light (no torch import) so the CLI can register quickly.
"""
