"""The engines ``sparsec bench`` measures, each behind the same small interface
(``base.System``): sparsec itself, PyTorch eager, onnxruntime and llama.cpp."""
