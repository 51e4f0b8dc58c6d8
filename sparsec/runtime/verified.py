"""A record of artifact files whose weights were fully verified, so a later load of the
same unchanged file need not hash gigabytes again (docs/runtime.md, "Verification").

Hashing is deferred, never skipped: an entry names one file by its identity at the time
it was verified: device, inode, size, modification and change times in nanoseconds,
and the manifest's seal. Any write to the file (in place, through a mapping, or a new
file renamed over it) changes the change time (which user space cannot set back) or the
inode, so the entry no longer matches and the next load hashes every chunk again. What
it cannot see is a disk that silently flips bits under an unchanged inode; `sparsec
inspect --verify` (or ``load(verify="always")``) hashes everything regardless.

Entries are empty files named by a hash of the identity, in ``$SPARSEC_VERIFIED_DIR``
or ``$SPARSEC_CACHE_DIR/verified`` (default ``~/.cache/sparsec/verified``, beside the
autotune cache); a cache that cannot be written only means the next load verifies
again.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

ENTRY_LIMIT = 4096  # the oldest entries go beyond this many
FRESH_NS = 2_000_000_000  # files changed in the last 2 s are not recorded


def cache_dir() -> Path:
    if os.environ.get("SPARSEC_VERIFIED_DIR"):
        return Path(os.environ["SPARSEC_VERIFIED_DIR"])
    root = os.environ.get("SPARSEC_CACHE_DIR") or os.path.expanduser("~/.cache/sparsec")
    return Path(root) / "verified"


def _entry(identity: tuple, seal: str) -> Path:
    key = ":".join(str(part) for part in (*identity, seal))
    return cache_dir() / hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def file_identity(path: Path) -> tuple:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def known(path: Path, identity: tuple, seal: str) -> bool:
    """Whether this file, unchanged since ``identity`` was taken, was verified before."""
    try:
        return file_identity(path) == identity and _entry(identity, seal).exists()
    except OSError:
        return False


def record(path: Path, identity: tuple, seal: str) -> None:
    """Remember that the file with ``identity`` verified (if it is still unchanged)."""
    try:
        if file_identity(path) != identity:
            return  # changed while it was being hashed: verify again next time
        if time.time_ns() - identity[4] < FRESH_NS:
            # File times tick coarsely (a few ms): a file changed this recently could
            # change again with the same times. Such a file is verified at every load.
            return
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        _entry(identity, seal).touch()
        entries = list(folder.iterdir())
        if len(entries) > ENTRY_LIMIT:
            entries.sort(key=lambda p: p.stat().st_mtime)
            for old in entries[: len(entries) - ENTRY_LIMIT]:
                old.unlink(missing_ok=True)
    except OSError:
        pass  # an unwritable cache: the next load verifies again
