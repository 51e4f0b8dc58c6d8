"""Checks on the paths a command writes, made before any work starts.

Every stage writes its output atomically (a temp file renamed over the target), so an
interrupted command never leaves a half-written file; what is checked here is that the
target is one the user can mean: not one of the command's own inputs, not inside an
input model folder (a Hugging Face folder read by export or sparsify), not a device,
directory or other non-regular file, and in a folder that exists or can be made.

It also keeps the stop request of the running command: ``sparsec.cli.main`` turns SIGINT
and SIGTERM into ``request_stop`` plus an exception (``KeyboardInterrupt``, or
``Terminated`` for SIGTERM); a library that swallows or wraps that exception (torch's
exporter does) cannot make sparsec replace an output anyway: the atomic writes of
export, optimize and convert (``sparsec.onnx_io.save_atomic``, ``sparsec.models``) call
``check_stop`` before their final rename.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sparsec.errors import SparsecError

# Linux NAME_MAX: a longer file name fails only at the final rename, after the work.
NAME_MAX = 255
# The name of the temp file written beside the output (".NAME.XXXXXXXX.tmp").
_TEMP_OVERHEAD = 16


def check_output_path(
    output: str | os.PathLike,
    *,
    inputs: tuple[str | os.PathLike | None, ...] = (),
    input_dirs: tuple[str | os.PathLike | None, ...] = (),
    what: str = "-o",
    directory: bool = False,
) -> Path:
    """Refuse an output path that would overwrite an input or cannot be a file we write.

    ``inputs``: files the command reads (the output must not be one of them).
    ``input_dirs``: model folders the command reads (the output must not be inside one,
    nor be the folder itself; a folder output must not contain one either).
    ``directory``: the output is a folder (sparsify, convert).
    Returns the output as a Path. Raises SparsecError naming ``what`` and the path.
    """
    out = Path(output)
    name = str(output)
    if not name or name.endswith(os.sep) and not directory:
        raise SparsecError(f"{what} {name!r} is not a file name; name the file to write")
    if len(out.name.encode("utf-8", "surrogateescape")) + _TEMP_OVERHEAD > NAME_MAX:
        raise SparsecError(
            f"{what} {name[:60]}...: the file name is {len(out.name)} characters long; "
            f"use a name under {NAME_MAX - _TEMP_OVERHEAD} characters"
        )
    resolved = _resolve(out)
    for path in inputs:
        if path is not None and _same_file(resolved, Path(path)):
            raise SparsecError(
                f"{what} {name} is also an input of this command ({path}); write the output "
                "to another path so the input stays intact"
            )
    for folder in input_dirs:
        if folder is None:
            continue
        folder_resolved = _resolve(Path(folder))
        if resolved == folder_resolved or resolved.is_relative_to(folder_resolved):
            raise SparsecError(
                f"{what} {name} is inside the input model folder {folder}; write the output "
                "outside it so the model's files stay intact"
            )
        if directory and folder_resolved.is_relative_to(resolved):
            # A folder output replaces the folder: one holding the input model would go.
            raise SparsecError(
                f"{what} {name} contains the input model folder {folder}; sparsec replaces "
                "an output folder as a whole, so write it outside"
            )
    if resolved.is_relative_to("/proc") or resolved.is_relative_to("/sys"):
        raise SparsecError(f"{what} {name} is under a kernel filesystem; write to a real folder")
    try:
        st = os.stat(resolved)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise SparsecError(f"{what} {name}: {exc.strerror or exc}") from exc
    if st is not None:
        if directory:
            if not stat.S_ISDIR(st.st_mode):
                raise SparsecError(
                    f"{what} {name} exists and is not a folder; name a new or existing folder"
                )
        elif stat.S_ISDIR(st.st_mode):
            raise SparsecError(f"{what} {name} is a folder; name the file to write inside it")
        elif not stat.S_ISREG(st.st_mode):
            raise SparsecError(
                f"{what} {name} is not a regular file (a device, pipe or socket); sparsec "
                "replaces its output with a new file, so name a regular file"
            )
    parent = resolved.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SparsecError(f"{what} {name}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SparsecError(f"{what} {name}: the folder {parent} is not writable")
    return out


def write_text_atomic(out: Path, text: str, what: str) -> None:
    """``text`` into ``out`` through a temp file renamed over it (an interrupted write
    leaves the old file or none); a failure is one line naming ``what``."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SparsecError(f"{what} {out}: cannot write it ({exc.strerror or exc})") from exc


def _resolve(path: Path) -> Path:
    # strict=False: the output usually does not exist yet; symlinks on the way resolve.
    return Path(os.path.abspath(path)).resolve(strict=False)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return _resolve(a) == _resolve(b)
