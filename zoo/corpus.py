"""Build the qtutor-tiny corpus from public-domain English texts packaged by Debian.

Usage (from the repository root)::

    apt-get install --no-install-recommends \\
        bible-kjv jargon-text dict-devil cfi-en r-cran-janeaustenr
    python -m zoo.corpus --out .carry/corpus --assets qtutor/assets/qtutor-tiny

The sources, each under the licence its Debian ``copyright`` file states
(checked at run time and copied into the manifest):

* ``bible-kjv-text``: the King James Bible (1611), one document per book;
* ``r-cran-janeaustenr``: Jane Austen's six novels, one document per chapter;
* ``jargon-text``: the Jargon File 4.4.7, one document per lexicon entry or chapter;
* ``dict-devil``: Ambrose Bierce's *The Devil's Dictionary*, one document per entry;
* ``cfi-en``: Linus Walleij's *Copyright Does Not Exist*, one document per chapter.

Each document is cleaned (markup and headers stripped, hard-wrapped lines joined,
typographic punctuation mapped to ASCII, whitespace normalised) into one paragraph
or verse line per line; documents are separated by one blank line. Whole
documents are then assigned to ``train.txt`` or ``heldout.txt`` (never split
between them), separately for each source so that the held-out part covers
every source, with a fixed seed.

Output, in ``--out``: ``train.txt``, ``heldout.txt``, ``manifest.json`` (sources,
package versions, licences, per-split byte/document/token counts, sha256 sums)
and ``tokenizer/`` (a byte-level BPE trained on ``train.txt`` only, see
``zoo.tokenizer``). With ``--assets DIR`` the tokenizer files and
``heldout.txt`` are also copied to ``DIR``.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import html.parser
import json
import lzma
import random
import re
import shutil
import struct
import subprocess
import sys
import unicodedata
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import transformers

from zoo import tokenizer as tokenizer_lib

Document = tuple[str, str]  # (document id, cleaned text)

# ---------------------------------------------------------------------------
# Text cleaning helpers
# ---------------------------------------------------------------------------

_PUNCTUATION = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u00b4": "'",
        "\u2014": "--",
        "\u2013": "-",
        "\u2022": "*",
        "\u2192": "->",
    }
)
_BOX_DRAWING = re.compile("[\u2500-\u257f]")


def normalise(line: str) -> str:
    """Map typographic punctuation to ASCII, apply NFKC and collapse whitespace."""
    line = unicodedata.normalize("NFKC", line.translate(_PUNCTUATION))
    return " ".join(line.split())


def reflow(text: str) -> list[str]:
    """Join hard-wrapped lines into paragraphs.

    Paragraphs are separated by blank lines. Inside one, a line that starts
    with whitespace (verse, quotations, a first line indented as in a
    typescript) starts a new output line; an unindented line continues the
    previous one. Returns the normalised, non-empty output lines.
    """
    out: list[str] = []
    joinable = False
    for line in text.splitlines():
        if not line.strip():
            joinable = False
        elif joinable and not line[0].isspace():
            out[-1] += " " + line
        else:
            out.append(line)
            joinable = True
    return [n for n in map(normalise, out) if n]


def strip_underscore_italics(line: str) -> str:
    """Remove the ``_italic_`` markers of plain-text editions."""
    return re.sub(r"_([^_]+)_", r"\1", line)


def letter_ratio(line: str) -> float:
    """Fraction of the non-blank characters of ``line`` that are letters."""
    chars = [c for c in line if not c.isspace()]
    return sum(c.isalpha() for c in chars) / max(len(chars), 1)


# ---------------------------------------------------------------------------
# R lazy-load databases (for r-cran-janeaustenr), decoded without R
# ---------------------------------------------------------------------------

# SEXP type codes from R's serialize.c.
_NILVALUE, _REFSXP, _SYMSXP, _LISTSXP = 254, 255, 1, 2
_CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP = 9, 10, 13, 14, 16, 19


class _RReader:
    """Decoder for the subset of R's XDR serialization (versions 2 and 3) that
    data-only packages use: vectors, named lists, pairlists and symbols."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an XDR-serialized R object")
        self.data, self.pos, self.refs = data, 2, []
        version = self._int()
        self._int(), self._int()  # writer's and minimal reader's R versions
        if version == 3:
            n = self._int()
            self.pos += n  # skip the native encoding's name

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # long vector: two 32-bit halves follow
            n = (self._int() << 32) + self._int()
        return n

    def _vector(self, fmt: str, size: int) -> list:
        n = self._length()
        values = list(struct.unpack_from(f">{n}{fmt}", self.data, self.pos))
        self.pos += size * n
        return values

    def read(self):
        """Read one object. Vectors become lists, or dicts when they have names."""
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == _NILVALUE:
            return None
        if kind == _REFSXP:
            return self.refs[(flags >> 8 or self._int()) - 1]
        if kind == _SYMSXP:
            self.refs.append(self.read())
            return self.refs[-1]
        if kind == _LISTSXP:  # pairlist (attributes): returned as a dict
            if has_attr:
                self.read()
            tag = self.read() if has_tag else None
            head = {tag: self.read()}
            return head | (self.read() or {})
        if kind == _CHARSXP:
            n = self._int()
            if n == -1:
                return None
            self.pos += n
            return self.data[self.pos - n : self.pos].decode("utf-8")
        if kind in (_LGLSXP, _INTSXP):
            values = self._vector("i", 4)
        elif kind == _REALSXP:
            values = self._vector("d", 8)
        elif kind in (_STRSXP, _VECSXP):
            values = [self.read() for _ in range(self._length())]
        else:
            raise ValueError(f"unsupported R object type {kind}")
        names = (self.read() if has_attr else {}).get("names")
        return dict(zip(names, values, strict=True)) if names else values


def read_r_lazyload_db(stem: Path) -> dict:
    """Return all objects of the R lazy-load database ``stem``.rdb/.rdx by name."""
    index = _RReader(gzip.decompress(stem.with_suffix(".rdx").read_bytes())).read()
    compression = index["compressed"][0]
    blob = stem.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[offset + 4 : offset + length]  # after the 4-byte plain length
        if compression == 1:
            raw = zlib.decompress(chunk)
        elif chunk[:1] == b"0":  # bzip2/xz databases keep small objects as-is
            raw = chunk[1:]
        else:
            raw = (bz2 if compression == 2 else lzma).decompress(chunk[1:])
        objects[name] = _RReader(raw).read()
    return objects


# ---------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------


def load_kjv() -> list[Document]:
    """The King James Bible, dumped by the ``bible`` program: one document per book.

    Each book keeps its chapter headings ("Genesis 1"); verses lose their numbers.
    """
    dump = subprocess.run(["bible", "-l100000", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    books: dict[str, list[str]] = {}
    verses = 0
    for line in dump.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():  # chapter heading, e.g. "1 Samuel 3"
            book = line.rsplit(" ", 1)[0]
            books.setdefault(book, []).append(normalise(line))
        else:  # "  12 And God said, ..."
            books[book].append(normalise(line.split(None, 1)[1]))
            verses += 1
    if len(books) != 66 or verses != 31102:
        raise RuntimeError(f"unexpected bible dump: {len(books)} books, {verses} verses")
    return [(book, "\n".join(lines)) for book, lines in books.items()]


_AUSTEN_CHAPTER = re.compile(r"^\s*chapter\s+[0-9ivxlc]+\s*$", re.IGNORECASE)
_AUSTEN_DROP = re.compile(r"^\s*volume\s+[ivx]+\s*$", re.IGNORECASE)


def load_austen() -> list[Document]:
    """Jane Austen's six novels: the title page, then one document per chapter."""
    novels = read_r_lazyload_db(Path("/usr/lib/R/site-library/janeaustenr/data/Rdata"))
    docs = []
    for name, lines in novels.items():
        chapters: list[list[str]] = [[]]
        for line in lines:
            if line.strip() == "A NOTE ON THE TEXT":  # a modern editor's note
                break
            if _AUSTEN_CHAPTER.match(line):
                chapters.append([])
            if not _AUSTEN_DROP.match(line):
                chapters[-1].append(strip_underscore_italics(line))
        for i, chapter in enumerate(chapters):
            docs.append((f"{name}-{i:02d}", "\n".join(reflow("\n".join(chapter)))))
    return docs


_JARGON_ENTRY = re.compile(r"^   :(.+?):\s*(.*)$")
_JARGON_LETTER = re.compile(r"^  [0-9A-Z]$")
_JARGON_TOC_NUMBER = re.compile(r"^(?:Chapter |Appendix )?(?:[0-9]+|[IVX]+|[A-C])\. ")


def load_jargon() -> list[Document]:
    """The Jargon File: each lexicon entry is a document, and so is each titled
    section of the front chapters and appendices.

    Tables of contents, letter headings, box-drawn tables and ASCII art are
    dropped; ``{cross-reference}`` braces are removed.
    """
    text = gzip.decompress(Path("/usr/share/doc/jargon-text/jargon.txt.gz").read_bytes())
    lines = text.decode("utf-8").replace("\xa0", " ").splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == "Welcome to the Jargon File")
    # Section titles (at column 0) and subsection titles (indented by two spaces),
    # used to recognise the tables of contents, which list them indented by three.
    titles = {_JARGON_TOC_NUMBER.sub("", ln.strip()) for ln in lines if re.match(r"^ {0,2}\S", ln)}
    titles.add("Table of Contents")

    # (title, first line, body lines); an empty title marks text to drop.
    sections: list[tuple[str, str, list[str]]] = [("Welcome to the Jargon File", "", [])]
    in_glossary = False
    for line in lines[start + 1 :]:
        entry = _JARGON_ENTRY.match(line)
        if line and not line[0].isspace() and not _BOX_DRAWING.search(line):
            in_glossary = line == "Glossary"  # what follows is a list of all headwords
            sections.append(("", "", []) if in_glossary else (line, line, []))
        elif entry and in_glossary:
            details = re.sub(r"^//,?\s*", "", entry[2])  # drop empty pronunciations
            sections.append((entry[1], f"{entry[1]}: {details}".strip(), []))
        elif _JARGON_LETTER.match(line):  # a letter's list of headwords follows
            sections.append(("", "", []))
        else:
            sections[-1][2].append(line)

    docs = []
    for title, first, body in sections:
        kept = [first]
        for line in body:
            stripped = line.strip()
            if (
                _BOX_DRAWING.search(line)
                or (stripped and letter_ratio(stripped) < 0.5)
                or (line.startswith("   ") and _JARGON_TOC_NUMBER.sub("", stripped) in titles)
            ):
                kept.append("")
            else:  # drop the base indentation of three spaces and the braces
                line = line[3:] if line.startswith("   ") else line
                kept.append(line.replace("{", "").replace("}", ""))
        paragraphs = reflow("\n".join(kept))
        if title and sum(map(len, paragraphs)) >= 200:
            docs.append((title, "\n".join(paragraphs)))
    return docs


def load_devil() -> list[Document]:
    """The Devil's Dictionary (dictd edition): the preface, then one document per entry."""
    data = gzip.decompress(Path("/usr/share/dictd/devil.dict.dz").read_bytes())
    base64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def number(digits: str) -> int:
        value = 0
        for digit in digits:
            value = value * 64 + base64.index(digit)
        return value

    spans: dict[tuple[int, int], str] = {}
    for line in Path("/usr/share/dictd/devil.index").read_text().splitlines():
        word, offset, length = line.split("\t")
        spans.setdefault((number(offset), number(length)), word)

    docs = []
    for (offset, length), word in sorted(spans.items()):
        text = data[offset : offset + length].decode("utf-8")
        if word == "00databaseinfo":
            word, text = "preface", text[text.index("PREFACE") :]
        elif word.startswith("00"):
            continue
        lines = [strip_underscore_italics(line) for line in reflow(text)]
        docs.append((word, "\n".join(lines)))
    return docs


class _HTMLText(html.parser.HTMLParser):
    """Collects the text of an HTML page, one line per block element."""

    BLOCKS = {"p", "br", "div", "tr", "li", "h1", "h2", "h3", "h4", "blockquote", "table"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCKS:
            self.parts.append("\n")
        self.skip += tag in ("title", "script", "style")

    def handle_endtag(self, tag):
        if tag in self.BLOCKS:
            self.parts.append("\n")
        self.skip -= tag in ("title", "script", "style")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data.replace("\n", " "))

    def lines(self) -> list[str]:
        """The page's text, normalised, without empty lines or navigation links."""
        lines = map(normalise, "".join(self.parts).split("\n"))
        return [line for line in lines if line and line != "INDEX"]


def load_cfi() -> list[Document]:
    """*Copyright Does Not Exist* (English HTML edition): one document per chapter."""
    folder = Path("/usr/share/doc/cfi-en/html")
    pages = ["preface"] + [f"ch{i}web" for i in range(1, 18)] + ["ottoen"]
    docs = []
    for page in pages:
        parser = _HTMLText()
        parser.feed(folder.joinpath(page + ".htm").read_text(encoding="utf-8"))
        docs.append((page, "\n".join(parser.lines())))
    return docs


@dataclass(frozen=True)
class Source:
    """One Debian package providing text, and how to read and license-check it."""

    name: str
    title: str
    packages: tuple[str, ...]  # to install; the first one holds the text
    needs: tuple[str, ...]  # files or programs that must exist
    license: str  # summary of the licence
    license_markers: tuple[str, ...]  # phrases that the copyright file must contain
    loader: Callable[[], list[Document]]

    @property
    def copyright_file(self) -> Path:
        return Path("/usr/share/doc", self.packages[0], "copyright")


SOURCES = (
    Source(
        "kjv",
        "The Holy Bible, King James Version (1611)",
        ("bible-kjv-text", "bible-kjv"),
        ("/usr/lib/bible.data", "bible"),
        "public domain (copyright expired)",
        ("The copyright for the King James Version text of the Bible is expired",),
        load_kjv,
    ),
    Source(
        "austen",
        "Jane Austen, the six completed novels (1811-1818)",
        ("r-cran-janeaustenr",),
        ("/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb",),
        "MIT (the R package); the novels themselves are in the public domain",
        ("License: MIT",),
        load_austen,
    ),
    Source(
        "jargon",
        "The Jargon File, version 4.4.7 (Eric S. Raymond, ed.)",
        ("jargon-text",),
        ("/usr/share/doc/jargon-text/jargon.txt.gz",),
        "public domain",
        ("This document (the Jargon File) is in the public domain",),
        load_jargon,
    ),
    Source(
        "devil",
        "Ambrose Bierce, The Devil's Dictionary (1911)",
        ("dict-devil",),
        ("/usr/share/dictd/devil.dict.dz", "/usr/share/dictd/devil.index"),
        "public domain (copyright expired)",
        ("The Devil's Dictionary is in the public domain",),
        load_devil,
    ),
    Source(
        "cfi",
        "Linus Walleij, Copyright Does Not Exist (English translation by Daniel Arnrup)",
        ("cfi-en",),
        ("/usr/share/doc/cfi-en/html/ch1web.htm",),
        "public domain (per the Debian copyright file, which overrides the restriction stated in the English preface)",
        ("it's in", "the public domain", "the translator agrees to"),
        load_cfi,
    ),
)


# ---------------------------------------------------------------------------
# Package checks, split and output
# ---------------------------------------------------------------------------


def missing_packages() -> list[str]:
    """Debian packages whose files or programs are missing on this machine."""
    missing = []
    for source in SOURCES:
        for need in source.needs:
            found = Path(need).exists() if need.startswith("/") else shutil.which(need)
            if not found:
                missing += [p for p in source.packages if p not in missing]
    return missing


def package_version(package: str) -> str:
    """Installed version of a Debian package."""
    return subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True, check=True
    ).stdout


def license_lines(source: Source) -> list[str]:
    """The paragraphs of the source's copyright file that state its licence.

    Raises if one of the expected licence statements is missing, so that a
    changed licence is noticed instead of silently recorded.
    """
    text = source.copyright_file.read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text)]
    found = []
    for marker in source.license_markers:
        matches = [p for p in paragraphs if marker in p]
        if not matches:
            raise RuntimeError(f"{source.copyright_file}: licence statement {marker!r} not found")
        found += [p for p in matches if p not in found]
    return found


def split_documents(docs: list[Document], fraction: float, seed: str) -> set[int]:
    """Choose the indices of the held-out documents.

    Documents are visited in a seeded random order and added while the
    held-out bytes stay within 125% of ``fraction`` of the source, until
    that fraction is reached.
    """
    sizes = [len(text.encode()) for _, text in docs]
    target = fraction * sum(sizes)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    chosen: set[int] = set()
    total = 0
    for i in order:
        if total >= target:
            break
        if total + sizes[i] <= 1.25 * target:
            chosen.add(i)
            total += sizes[i]
    return chosen


def sha256(path: Path) -> str:
    """Hex SHA-256 digest of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shared_lines(train: str, heldout: str, min_chars: int = 80) -> int:
    """Number of held-out lines of at least ``min_chars`` that also occur in train.

    Whole documents never straddle the split, but a text may quote itself
    (the Bible's parallel passages, for instance); this measures how much.
    """
    train_lines = set(train.splitlines())
    return sum(len(ln) >= min_chars and ln in train_lines for ln in heldout.splitlines())


def build(out: Path, fraction: float, seed: int, vocab_size: int) -> dict:
    """Write the corpus, its tokenizer and the manifest into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    parts: dict[str, list[str]] = {"train": [], "heldout": []}
    manifest: dict = {
        "format": "UTF-8 text; one paragraph or verse line per line; documents separated by one blank line",
        "split": {"unit": "whole documents, per source", "heldout_fraction": fraction, "seed": seed},
        "sources": [],
    }
    for source in SOURCES:
        docs = [(doc_id, text) for doc_id, text in source.loader() if text]
        heldout = split_documents(docs, fraction, f"{seed}-{source.name}")
        counts = {"train": {"documents": 0, "bytes": 0}, "heldout": {"documents": 0, "bytes": 0}}
        for i, (_, text) in enumerate(docs):
            split = "heldout" if i in heldout else "train"
            parts[split].append(text)
            counts[split]["documents"] += 1
            counts[split]["bytes"] += len(text.encode())
        manifest["sources"].append(
            {
                "name": source.name,
                "title": source.title,
                "debian_packages": {p: package_version(p) for p in source.packages},
                "license": source.license,
                "copyright_file": str(source.copyright_file),
                "license_lines": license_lines(source),
                "heldout_documents": sorted(docs[i][0] for i in heldout),
                **counts,
            }
        )
        print(
            f"{source.name:>7}: {len(docs)} documents, "
            f"{counts['train']['bytes'] / 1e6:.2f} MB train, "
            f"{counts['heldout']['bytes'] / 1e6:.2f} MB held-out"
        )

    texts = {split: "\n\n".join(docs) + "\n" for split, docs in parts.items()}
    for split, text in texts.items():
        path = out / f"{split}.txt"
        path.write_text(text, encoding="utf-8")
        manifest[split] = {
            "file": path.name,
            "documents": len(parts[split]),
            "bytes": len(text.encode()),
            "sha256": sha256(path),
        }
    manifest["heldout"]["long_lines_also_in_train"] = shared_lines(texts["train"], texts["heldout"])

    tokenizer_dir = out / "tokenizer"
    tokenizer = tokenizer_lib.train_tokenizer(out / "train.txt", tokenizer_dir, vocab_size)
    auto_class = tokenizer_lib.check_tokenizer(tokenizer_dir, texts["heldout"])
    manifest["tokenizer"] = {
        "folder": tokenizer_dir.name,
        "type": "byte-level BPE (tokenizers), trained on train.txt only",
        "vocab_size": tokenizer.get_vocab_size(),
        "checked_with": f"transformers {transformers.__version__}: PreTrainedTokenizerFast "
        f"and AutoTokenizer (which chose {auto_class}) give identical ids and round-trip",
        "files": {p.name: sha256(p) for p in sorted(tokenizer_dir.iterdir())},
    }
    for split, text in texts.items():
        n = len(tokenizer.encode(text).ids)
        manifest[split]["tokens"] = n
        manifest[split]["bytes_per_token"] = round(len(text.encode()) / n, 3)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--heldout-fraction", type=float, default=0.09)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--assets", type=Path, help="also copy tokenizer files and heldout.txt to this folder")
    args = parser.parse_args(argv)

    missing = missing_packages()
    if missing:
        sys.exit(
            f"error: corpus sources are not installed; run: apt-get install --no-install-recommends {' '.join(missing)}"
        )
    manifest = build(args.out, args.heldout_fraction, args.seed, args.vocab_size)
    for split in ("train", "heldout"):
        info = manifest[split]
        print(f"{split}: {info['documents']} documents, {info['bytes']} bytes, {info['tokens']} tokens")
    if args.assets:
        args.assets.mkdir(parents=True, exist_ok=True)
        for path in (args.out / "tokenizer").iterdir():
            shutil.copy2(path, args.assets / path.name)
        shutil.copy2(args.out / "heldout.txt", args.assets / "heldout.txt")
        print(f"copied tokenizer and heldout.txt to {args.assets}")


if __name__ == "__main__":
    main()
