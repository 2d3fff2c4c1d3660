"""Where documents come from: the offline default corpus, local files and folders, Hugging Face datasets.

A corpus is an ordered stream of document strings; the order is fixed (files sorted by relative path,
documents in file order) so that everything downstream of it can be reproduced.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from hashlib import blake2b
from pathlib import Path

from lmscope.errors import CorpusError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
PYDOC_DIR = Path("/usr/share/doc/python3-doc/html/_sources")
FILE_FORMATS = (".txt", ".jsonl", ".parquet")
CHOICES = "'default', 'hf:<dataset>[:<config>][:<split>]', or a .txt/.jsonl/.parquet file or a folder of them"
# Bump when the way files are cut into documents changes, so old fingerprints stop matching.
_READER_VERSION = 1


@dataclass(frozen=True)
class _File:
    name: str  # stable name relative to the corpus root: orders the files and feeds the fingerprint
    path: Path
    read: Callable[[Path], Iterator[str]]


def iter_documents(
    source: str | Path = "default", *, text_field: str = "text", txt_separator: str | None = None
) -> Iterator[str]:
    """Yield the non-empty documents of a corpus, always in the same order.

    `source` is `default` (Debian `fortunes` + `python3-doc`), a `.txt`, `.jsonl` or `.parquet` file, a
    folder searched recursively for those, or `hf:<dataset>[:<config>][:<split>]` (streamed).
    `text_field` names the JSON field / Parquet column / dataset column holding the text. A `.txt` file is
    one document unless `txt_separator` is given: then every line equal to it (after stripping
    whitespace; `""` means blank lines) ends a document.

    Example: `for doc in iter_documents("corpus/"): ...`. Errors (missing path, unknown format, no documents) raise `CorpusError` before the first document.
    """
    if isinstance(source, str) and source.startswith("hf:"):
        docs = _hf_documents(source, text_field)
    else:
        files = _resolve_files(source, text_field, txt_separator)
        docs = (doc for f in files for doc in f.read(f.path))
    first = next(docs, None)  # fail now, not at the caller's first step, when the corpus is empty
    if first is None:
        raise CorpusError(f"corpus {str(source)!r} holds no documents; pass {CHOICES}")

    def stream() -> Iterator[str]:
        yield first
        yield from docs

    return stream()


def corpus_fingerprint(
    source: str | Path = "default", *, text_field: str = "text", txt_separator: str | None = None
) -> str:
    """A short hex digest of what `iter_documents` would read: relative paths, sizes and mtimes.

    Cheap (no file is read), so a store can refuse to resume on a different corpus. A file touched
    without change, or the same corpus copied elsewhere with new mtimes, also counts as different.
    For `hf:` sources only the spec is hashed: the dataset's revision is not checked.
    """
    h = blake2b(digest_size=8)
    h.update(repr((_READER_VERSION, text_field, txt_separator)).encode())
    if isinstance(source, str) and source.startswith("hf:"):
        h.update(source.encode())
    else:
        for f in _resolve_files(source, text_field, txt_separator):
            st = f.path.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _resolve_files(source: str | Path, text_field: str, txt_separator: str | None) -> list[_File]:
    if str(source) == "default":
        return _default_files()
    path = Path(source)
    if not path.exists():
        raise CorpusError(f"corpus {str(source)!r} does not exist; pass {CHOICES}")
    if path.is_file():
        return [_File(path.name, path, _reader(path, text_field, txt_separator))]
    files = sorted(
        (p.relative_to(path).as_posix(), p)
        for p in path.rglob("*")
        if p.is_file() and p.suffix in FILE_FORMATS and not p.name.startswith(".")
    )
    if not files:
        raise CorpusError(
            f"folder {str(path)!r} holds no {'/'.join(FILE_FORMATS)} files; pass {CHOICES}"
        )
    return [_File(name, p, _reader(p, text_field, txt_separator)) for name, p in files]


def _reader(
    path: Path, text_field: str, txt_separator: str | None
) -> Callable[[Path], Iterator[str]]:
    if path.suffix == ".txt":
        return functools.partial(_read_txt, separator=txt_separator)
    if path.suffix == ".jsonl":
        return functools.partial(_read_jsonl, field=text_field)
    if path.suffix == ".parquet":
        return functools.partial(_read_parquet, column=text_field)
    raise CorpusError(
        f"unknown corpus format {path.suffix!r} for {str(path)!r}; valid: {', '.join(FILE_FORMATS)}"
    )


# --- file formats ------------------------------------------------------------------------------------


def _read_txt(path: Path, separator: str | None) -> Iterator[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    yield from _split_lines(text, separator) if separator is not None else _nonempty([text])


def _split_lines(text: str, separator: str) -> Iterator[str]:
    doc: list[str] = []
    for line in text.split("\n"):
        if line.strip() == separator:
            yield from _nonempty(["\n".join(doc)])
            doc = []
        else:
            doc.append(line)
    yield from _nonempty(["\n".join(doc)])


def _nonempty(docs: list[str]) -> Iterator[str]:
    # Leading/trailing blank lines are layout, not content; indentation of the first line is kept.
    for doc in docs:
        doc = doc.strip("\n")
        if doc.strip():
            yield doc


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise CorpusError(f"{path}:{lineno} has no string field {field!r}; fields: {keys}")
            yield from _nonempty([row[field]])


def _read_parquet(path: Path, column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if column not in pf.schema_arrow.names:
        raise CorpusError(
            f"{path} has no column {column!r}; columns: {', '.join(pf.schema_arrow.names)}"
        )
    # Record batches stream within row groups, so a huge file never sits in memory whole.
    for batch in pf.iter_batches(batch_size=1024, columns=[column]):
        yield from _nonempty([t for t in batch.column(0).to_pylist() if t is not None])


# --- the default corpus ------------------------------------------------------------------------------


def _default_files() -> list[_File]:
    if not FORTUNES_DIR.is_dir() or not PYDOC_DIR.is_dir():
        raise CorpusError(
            "the default corpus needs the Debian packages fortunes and python3-doc: "
            f"apt-get install fortunes python3-doc (or pass {CHOICES})"
        )
    # Top-level files only: this leaves out the offensive fortunes (fortunes-off installs them under
    # off/) and the translated ones (de/, it/, ...); .dat are indexes, .u8 are links to the same text.
    fortunes = sorted(
        p
        for p in FORTUNES_DIR.iterdir()
        if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
    )
    pydocs = sorted((p.relative_to(PYDOC_DIR).as_posix(), p) for p in PYDOC_DIR.rglob("*.rst.txt"))
    return [_File(f"fortunes/{p.name}", p, _read_fortunes) for p in fortunes] + [
        _File(f"python3-doc/{name}", p, _read_rest) for name, p in pydocs
    ]


_OVERSTRIKE = re.compile(r"[^\n\x08]\x08")


def _read_fortunes(path: Path) -> Iterator[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if "\x08" in text:  # only lines with a backspace are rescanned (overstrikes never span lines)
        text = "\n".join(_overstrike(line) for line in text.split("\n"))
    yield from _split_lines(text, "%")


def _overstrike(line: str) -> str:
    """Old fortunes underline or embolden with backspaces ("_\bx"); keep what a terminal shows."""
    while "\x08" in line:
        line, n = _OVERSTRIKE.subn("", line)
        if n == 0:
            line = line.replace("\x08", "")
    return line


def _read_rest(path: Path) -> Iterator[str]:
    yield from _nonempty(split_rest_sections(path.read_text(encoding="utf-8", errors="replace")))


# A line of one punctuation character repeated: a reST title adornment (or a transition).
_ADORNMENT = re.compile(r"([!-/:-@\[-`{-~])\1+[ \t]*")


def split_rest_sections(text: str) -> list[str]:
    """Cut a reST page at its title and top-level section headings (the first two adornment styles).

    Whole pages run to 200 kB (stdtypes, os) and there are only ~500 of them; sections give several
    thousand documents, so the hash-based train/eval split and the document shuffle are finer grained.
    Joining the pieces with newlines gives back the page.
    """
    lines = text.split("\n")
    styles: list[tuple[str, bool]] = []  # reST ranks heading styles by first appearance in the page
    starts = [0]
    for i in range(1, len(lines)):
        under, title = lines[i], lines[i - 1]
        if not _ADORNMENT.fullmatch(under) or not title.strip() or _ADORNMENT.fullmatch(title):
            continue
        overlined = i >= 2 and lines[i - 2].rstrip() == under.rstrip()
        if len(under.rstrip()) < len(title.strip()) or (title[0].isspace() and not overlined):
            continue
        top = i - 2 if overlined else i - 1
        # A real title follows a blank line; text right above it makes this something else.
        if top > 0 and lines[top - 1].strip():
            continue
        style = (under[0], overlined)
        if style not in styles:
            styles.append(style)
        if styles.index(style) <= 1 and top > starts[-1]:
            starts.append(top)
    return ["\n".join(lines[a:b]) for a, b in zip(starts, starts[1:] + [len(lines)])]


# --- Hugging Face datasets ---------------------------------------------------------------------------


def _hf_documents(source: str, text_field: str) -> Iterator[str]:
    parts = source[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3:
        raise CorpusError(
            f"bad dataset spec {source!r}; expected hf:<dataset>[:<config>][:<split>]"
        )
    name, config, split = parts[0], (parts + [""])[1] or None, (parts + ["", ""])[2] or "train"
    try:
        import datasets
    except ImportError:
        raise CorpusError(
            f"{source!r} needs the datasets library: pip install datasets (or lmscope[hf])"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        rows = iter(ds)
        first = next(rows, None)
    except Exception as e:  # the hub, the network and the dataset itself can all fail here
        raise CorpusError(f"could not stream {source!r}: {type(e).__name__}: {e}") from None
    if first is not None and text_field not in first:
        raise CorpusError(f"{source!r} has no column {text_field!r}; columns: {', '.join(first)}")

    def stream() -> Iterator[str]:
        if first is None:
            return
        yield from _nonempty([first[text_field] or ""])
        for row in rows:
            yield from _nonempty([row[text_field] or ""])

    return stream()
