"""User-facing errors.

Every failure caused by bad input or a bad environment raises ``SparsecError`` with a
message that names the bad thing and says what to do. The CLI prints it as one line
and exits non-zero; anything else escaping is a bug in sparsec.
"""


class SparsecError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class MissingDependencyError(SparsecError):
    """A stage needs packages that this install does not have."""


def require_compiler_stack() -> None:
    """Fail clearly when the compiler extra is missing (runtime-only installs)."""
    import importlib.util

    missing = [
        name
        for name in ("torch", "transformers", "onnx", "onnx_ir", "onnxscript", "llvmlite")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise MissingDependencyError(
            f"this command needs the compiler stack ({', '.join(missing)} not installed); "
            "install it with: pip install 'sparsec[compiler]'"
        )
