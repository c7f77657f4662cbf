"""Jane Austen's six novels, read offline from the Debian package ``r-cran-janeaustenr``.

The package is fetched with ``apt-get download`` (never installed: that would pull in R) and unpacked
with ``dpkg -x``. Its data is an R lazy-load database: ``Rdata.rdx`` is a gzip-compressed serialized
index (variable name -> offset, length into ``Rdata.rdb``), and each ``.rdb`` chunk is a 4-byte length
followed by a compressed R serialization. A minimal XDR unserializer, enough for such data, is here.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path
from typing import Any

from train.data import cache, text
from train.data.source import Source
from train.data.splits import TEXT_FRACTIONS, TextSplits, text_splits

PACKAGE = "r-cran-janeaustenr"
APT_DEADLINE = 120  # seconds for fetching and unpacking the package (each network read: 10 s)
NOVELS = (  # publication order, as in janeaustenr::austen_books()
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)

# SEXP type codes (R internals, serialize.c)
NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 0, 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, NILVALUE_SXP = 255, 254
NA_INTEGER = -(2**31)
_CHAR_CODECS = ((1 << 3, "utf-8"), (1 << 2, "latin-1"), (1 << 1, "latin-1"), (1 << 6, "ascii"))


class RReader:
    """Reads one XDR ('X\\n') R serialization into Python values.

    STRSXP -> list[str | None]; INTSXP/LGLSXP -> list[int | bool | None] (NA -> None);
    REALSXP -> list[float]; VECSXP -> list; pairlists -> dict[tag, value]; symbols -> str;
    NULL -> None. A vector with a ``names`` attribute becomes a dict; other attributes are dropped.
    """

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError(f"not an XDR R serialization (header {data[:2]!r})")
        self.data, self.pos, self.refs = data, 2, []
        version = self._int()
        self.pos += 8  # writer's R version, minimal reader version
        self.encoding = "utf-8"
        if version == 3:
            self.encoding = self._bytes(self._int()).decode("ascii").lower()
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")

    def _bytes(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def _int(self) -> int:
        return struct.unpack(">i", self._bytes(4))[0]

    def _length(self) -> int:
        n = self._int()
        return n if n != -1 else (self._int() << 32) + self._int()

    def read(self) -> Any:
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (NILVALUE_SXP, NILSXP):
            return None
        if kind == REFSXP:
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if kind == SYMSXP:
            self.refs.append(self.read())
            return self.refs[-1]
        if kind == LISTSXP:
            return self._pairlist(has_attr, has_tag)
        if kind == CHARSXP:
            n = self._int()
            if n == -1:
                return None
            codec = next((c for mask, c in _CHAR_CODECS if flags >> 12 & mask), self.encoding)
            return self._bytes(n).decode(codec)
        if kind in (LGLSXP, INTSXP):
            n = self._length()
            ints = struct.unpack(f">{n}i", self._bytes(4 * n))
            cast = bool if kind == LGLSXP else int
            value = [None if i == NA_INTEGER else cast(i) for i in ints]
        elif kind == REALSXP:
            n = self._length()
            value = list(struct.unpack(f">{n}d", self._bytes(8 * n)))
        elif kind in (STRSXP, VECSXP):
            value = [self.read() for _ in range(self._length())]
        else:
            raise ValueError(f"unsupported SEXP type {kind} at byte {self.pos - 4}")
        names = self.read().get("names") if has_attr else None
        return dict(zip(names, value, strict=True)) if names else value

    def _pairlist(self, has_attr: int, has_tag: int) -> dict[str | None, Any]:
        if has_attr:
            self.read()
        tag = self.read() if has_tag else None
        head = {tag: self.read()}
        tail = self.read()
        return head | (tail or {})


def unserialize(data: bytes) -> Any:
    """Python value of one XDR R serialization (see ``RReader`` for the mapping)."""
    return RReader(data).read()


def _decompress_chunk(chunk: bytes, method: int) -> bytes:
    """One .rdb chunk: 4-byte big-endian length, then (zlib) or (type byte + payload)."""
    if method == 1:
        return zlib.decompress(chunk[4:])
    kind, payload = chunk[4:5], chunk[5:]
    decoders = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
    return decoders[kind](payload)


def read_lazyload_db(rdx: Path) -> dict[str, Any]:
    """All variables of an R lazy-load database (``NAME.rdx`` next to ``NAME.rdb``)."""
    index = unserialize(gzip.decompress(rdx.read_bytes()))
    method = int(index["compressed"][0])
    db = rdx.with_suffix(".rdb").read_bytes()
    return {
        name: unserialize(_decompress_chunk(db[offset : offset + length], method))
        for name, (offset, length) in index["variables"].items()
    }


def _run(args: list[str], cwd: Path) -> None:
    """Run a command; on failure raise OSError carrying its last line of stderr."""
    try:
        subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True, timeout=APT_DEADLINE)
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", None) or str(e)).strip().splitlines()
        raise OSError(f"{' '.join(args)}: {detail[-1] if detail else type(e).__name__}") from e


def _find(directory: Path, pattern: str) -> Path:
    found = sorted(directory.rglob(pattern))
    if not found:
        raise FileNotFoundError(f"no {pattern} under {directory}")
    return found[0]


def download_novels(workdir: Path) -> dict[str, list[str]]:
    """Fetch and unpack the Debian package into ``workdir``; novel name -> lines (needs apt, dpkg)."""
    _run(["apt-get", "download", "-o", "Acquire::http::Timeout=10", "-o", "Acquire::Retries=0", PACKAGE], workdir)
    _run(["dpkg", "-x", _find(workdir, f"{PACKAGE}_*.deb").name, "extracted"], workdir)
    return read_lazyload_db(_find(workdir / "extracted", "janeaustenr/data/Rdata.rdx"))


def austen_text(root: Path) -> str:
    """The six novels in publication order, lines joined by newlines (~4M chars); cached under ``root``.

    Raises ``OSError`` when the package cannot be fetched or unpacked, ``ValueError`` on bad data.
    """

    def build() -> dict[str, str]:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            novels = download_novels(Path(tmp))
        return {"text": "\n\n".join("\n".join(line or "" for line in novels[name]) for name in NOVELS)}

    return cache.cached(cache.cache_file(root, "austen"), build, keys=("text",))["text"]


def load(root: Path, seed: int, *, fractions: tuple[float, float, float] = TEXT_FRACTIONS) -> TextSplits:
    """Jane Austen's six novels (~4.0M chars) from Debian ``r-cran-janeaustenr``, else the pydoc topics."""
    try:
        return text_splits(austen_text(root), f"debian:{PACKAGE}", fractions)
    except (OSError, ValueError) as err:
        return text_splits(text.pydoc_text(), f"pydoc_data.topics (fallback: austen unavailable: {err})", fractions)


SOURCE = Source(
    "austen", "text", load, "Jane Austen's six novels, 4.0 M chars; Debian r-cran-janeaustenr (fetched, not installed)",
    offline=f"apt-get download {PACKAGE}, else falls back to pydoc",
)  # fmt: skip
