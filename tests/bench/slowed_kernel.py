"""A planted regression for the kernel check's tests: the real kernel, called twice.

Loaded by the working tree's side of the check through ``--emitter FILE:slowed_kernel``
(benchmarks/kernel_regression.py): same signature and result, twice the work.
"""

from __future__ import annotations


def slowed_kernel(module, name, packed, target):
    """``name`` calls the real kernel twice (noinline, so LLVM cannot merge the calls)."""
    from llvmlite import ir

    from sparsec.bench.kernel_suite import emit_kernel

    inner = emit_kernel(module, name + "_work", packed, target)
    inner.attributes.add("noinline")
    wrapper = ir.Function(module, inner.function_type, name)
    b = ir.IRBuilder(wrapper.append_basic_block("entry"))
    b.call(inner, wrapper.args)
    b.call(inner, wrapper.args)
    b.ret_void()
    return wrapper
