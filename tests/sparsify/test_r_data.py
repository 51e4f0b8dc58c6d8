"""The R lazy-load database reader behind builtin:austen and builtin:moby-dick.

The fixtures write the same files R's installer writes (a gzip-serialized index and
length-prefixed compressed entries) with rdata's own serializer, so these tests need
neither R nor the Debian packages.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import zlib

import numpy as np
import pytest
import rdata

from sparsec.errors import SparsecError
from sparsec.sparsify import data, r_data


def _serialize(obj, tmp_path) -> bytes:
    path = tmp_path / "obj.rds"
    rdata.write_rds(path, obj, compression=None)
    return path.read_bytes()


def _entry(raw: bytes, compression: int) -> bytes:
    head = len(raw).to_bytes(4, "big")
    if compression == 1:
        return head + zlib.compress(raw)
    kind, packed = {2: (b"2", bz2.compress(raw)), 3: (b"Z", lzma.compress(raw))}[compression]
    return head + kind + packed


def write_lazy_load(library, package, objects, tmp_path, compression=1):
    """Write ``objects`` as ``library/package/data/Rdata.{rdx,rdb}``."""
    folder = library / package / "data"
    folder.mkdir(parents=True)
    blob, variables = b"", {}
    for name, obj in objects.items():
        entry = _entry(_serialize(obj, tmp_path), compression)
        variables[name] = np.array([len(blob), len(entry)], dtype=np.int32)
        blob += entry
    index = {
        "variables": variables,
        "references": {},
        "compressed": np.array([compression], dtype=np.int32),
    }
    (folder / "Rdata.rdb").write_bytes(blob)
    (folder / "Rdata.rdx").write_bytes(gzip.compress(_serialize(index, tmp_path)))


@pytest.fixture
def library(tmp_path, monkeypatch):
    root = tmp_path / "site-library"
    monkeypatch.setattr(r_data, "R_SITE_LIBRARY", root)
    return root


@pytest.mark.parametrize("compression", [1, 2, 3], ids=["zlib", "bzip2", "xz"])
def test_reads_every_object_of_a_lazy_load_database(library, tmp_path, compression):
    books = {"emma": np.array(["EMMA", "", "Emma Woodhouse, handsome"]), "n": np.array([3])}
    write_lazy_load(library, "pkg", books, tmp_path, compression)
    objects = r_data.read_r_data("pkg", "apt-get install r-cran-pkg")
    assert sorted(objects) == ["emma", "n"]
    assert list(objects["emma"]) == ["EMMA", "", "Emma Woodhouse, handsome"]
    assert list(objects["n"]) == [3]


def test_missing_package_names_the_install_command(library):
    with pytest.raises(SparsecError, match="R package nopkg not found.*apt-get install x"):
        r_data.read_r_data("nopkg", "apt-get install x")


def test_corrupt_database_is_a_clear_error(library, tmp_path):
    write_lazy_load(library, "pkg", {"a": np.array(["x"])}, tmp_path)
    (library / "pkg" / "data" / "Rdata.rdb").write_bytes(b"\0\0\0\5garbage")
    with pytest.raises(SparsecError, match="not a readable R lazy-load database"):
        r_data.read_r_data("pkg", "hint")


def test_austen_is_one_document_a_novel_with_lines_joined(library, tmp_path):
    novels = {
        "persuasion": np.array(["Persuasion", "", "Sir Walter Elliot"]),
        "emma": np.array(["EMMA", "", "Emma Woodhouse"]),
    }
    write_lazy_load(library, "janeaustenr", novels, tmp_path)
    corpus = data.read_corpus("builtin:austen")
    assert not corpus.examples
    assert corpus.documents == ["EMMA\n\nEmma Woodhouse", "Persuasion\n\nSir Walter Elliot"]


def test_moby_dick_drops_the_gutenberg_header_and_licence(library, tmp_path):
    text = (
        "The Project Gutenberg EBook of Moby Dick\r\n\r\n*** START OF THIS PROJECT "
        "GUTENBERG EBOOK MOBY DICK ***\r\n\r\nCall me Ishmael.\r\n\r\n*** END OF THIS "
        "PROJECT GUTENBERG EBOOK ***\r\nlicence text"
    )
    write_lazy_load(library, "tokenizers", {"mobydick": np.array([text])}, tmp_path)
    assert data.read_corpus("builtin:moby-dick").documents == ["Call me Ishmael."]


def test_a_package_without_the_book_is_a_clear_error(library, tmp_path):
    write_lazy_load(library, "tokenizers", {"other": np.array(["x"])}, tmp_path)
    with pytest.raises(SparsecError, match="tokenizers has no mobydick data set .it has other"):
        data.read_corpus("builtin:moby-dick")


def test_missing_novels_name_the_debian_packages(library):
    with pytest.raises(SparsecError, match="fortunes r-cran-janeaustenr r-cran-tokenizers"):
        data.read_corpus("builtin:austen")
