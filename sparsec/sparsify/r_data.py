"""Read the data sets of an installed R package (Debian ``r-cran-*``), without R.

R installs a package's ``data/`` as a lazy-load database: ``Rdata.rdx`` is a
gzip-compressed serialized index mapping each object's name to an (offset, length) in
``Rdata.rdb``, where each entry is a 4-byte big-endian uncompressed length followed by
the compressed serialized object (zlib; or a type byte then bzip2 / xz). The ``rdata``
library parses R's serialization format; this module only finds the entries.

Debian's ``r-cran-janeaustenr`` ships Jane Austen's six novels and
``r-cran-tokenizers`` Melville's *Moby Dick*: the only narrative prose in a package
registry reachable here, and what ``builtin:austen`` / ``builtin:moby-dick`` read.
"""

from __future__ import annotations

import bz2
import lzma
import warnings
import zlib
from pathlib import Path

from sparsec.errors import SparsecError

R_SITE_LIBRARY = Path("/usr/lib/R/site-library")


def _decompress(entry: bytes, compressed: int, where: str) -> bytes:
    body = entry[4:]
    if compressed == 1:
        return zlib.decompress(body)
    # Types 2 and 3 carry one more byte naming what was actually used.
    kind, body = body[:1], body[1:]
    if kind == b"0":
        return body
    if kind == b"2":
        return bz2.decompress(body)
    if kind == b"Z":
        return lzma.decompress(body)
    raise SparsecError(f"{where}: unknown lazy-load compression {kind!r}")


def read_r_data(package: str, install_hint: str) -> dict[str, object]:
    """Every object in ``package``'s data sets, converted by ``rdata`` (vectors → numpy)."""
    base = R_SITE_LIBRARY / package / "data" / "Rdata"
    index_path, db_path = base.with_suffix(".rdx"), base.with_suffix(".rdb")
    if not index_path.is_file() or not db_path.is_file():
        raise SparsecError(f"R package {package} not found; install it with: {install_hint}")
    try:
        import rdata
    except ImportError as e:
        raise SparsecError(
            f"reading {package}'s data needs rdata: pip install 'sparsec[sparsify]'"
        ) from e

    def parse(raw: bytes):
        with warnings.catch_warnings():
            # Both files hold bare serialization streams, which rdata reads as RDS
            # after warning that they have no file header.
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(raw, expand_altrep=True))

    try:
        index = parse(index_path.read_bytes())
        compressed = int(index["compressed"][0])
        blob = db_path.read_bytes()
        objects = {}
        for name, (offset, length) in index["variables"].items():
            entry = blob[int(offset) : int(offset) + int(length)]
            objects[str(name)] = parse(_decompress(entry, compressed, str(db_path)))
    except SparsecError:
        raise
    except Exception as e:  # rdata's parse errors have no common base class
        raise SparsecError(f"{db_path}: not a readable R lazy-load database ({e})") from e
    return objects
