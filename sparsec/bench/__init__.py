"""Benchmarks of sparsec against the engines people already use (``sparsec bench``),
the read-bandwidth probe of the roofline, and the CI regression checks of the generated
kernels (``benchmarks/kernel_regression.py``)."""
