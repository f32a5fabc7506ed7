"""Readers of raw corpora: documents streamed from text and JSON lines (.jsonl/.json; each optionally .gz/.zst)
and parquet files.

Paths are local or remote (`gs://...`, through etils epath); a glob expands to its files in
sorted order. Every reader streams: memory is one parquet row group or one line at a time,
whatever the file's size. A document is `(file index, record index, text)`; its record index is
its line (jsonl), row (parquet) or 0 (a text file is one document).

Bad records (a malformed jsonl line, a non-string text field) raise SourceError naming the file
and line, or with `on_bad_record="skip"` are skipped and counted. Files that cannot be read at
all (a corrupt gzip or zstd stream, a parquet file without the text column, a .bz2 or .zip file)
always raise.
"""

from __future__ import annotations

import glob as globlib
import gzip
import io
import json
import zlib
from typing import Iterator, NamedTuple, Sequence

import pyarrow.parquet as pq
import zstandard
import fsspec
from etils import epath

from gqlm.config import ConfigError

FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "txt", "txt.gz", "txt.zst")
# Compressions and archives no reader here opens: refused by name, never tokenized as if text.
_UNREAD = (".bz2", ".xz", ".lzma", ".lz4", ".zip", ".7z", ".tar", ".tgz", ".tar.gz", ".tar.zst", ".br", ".zstd",
           ".parquet.gz", ".parquet.zst")
ON_BAD_RECORD = ("raise", "skip")


class SourceError(ConfigError):
    """A corpus file that cannot be read as its format says; the message names the file (and line)."""


class Document(NamedTuple):
    file_index: int
    record_index: int
    text: str


def format_of(path: str, forced: str = "") -> str:
    """The file's format: `forced`, else by extension: `.jsonl` or `.json` (JSON lines, as C4, Dolma
    and HF `Dataset.to_json` write them), `.parquet`, else text (one document per file); `.gz` /
    `.zst` after any of these but parquet is decompressed, other compressions are refused."""
    if forced:
        if forced not in FORMATS:
            raise ConfigError(f"--format={forced!r} must be one of {', '.join(FORMATS)}")
        return forced
    name = path.lower()
    if name.endswith(_UNREAD):
        suffix = next(e for e in _UNREAD if name.endswith(e))
        raise SourceError(f"{path}: {suffix} files are not read (formats: .jsonl/.json lines and text, each "
                          "optionally .gz or .zst, and .parquet); --format=txt reads its raw bytes as text")
    if name.endswith(".parquet"):
        return "parquet"
    compression = next((c for c in ("gz", "zst") if name.endswith("." + c)), "")
    base = "jsonl" if name.removesuffix("." + compression).endswith((".jsonl", ".json")) else "txt"
    return f"{base}.{compression}" if compression else base


def check_remote(path: str, flag: str) -> None:
    """A remote path's filesystem is installed (gs:// needs gcsfs: the `gcs` extra), else a one-line error."""
    protocol, sep, _ = path.partition("://")
    if not sep:
        return
    try:
        fsspec.get_filesystem_class("gcs" if protocol == "gs" else protocol)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"{flag}={path!r}: {e} (for gs:// install the gcs extra: pip install -e '.[gcs]')") from None


def expand(patterns: Sequence[str]) -> list[str]:
    """The files of each glob (sorted, deduplicated, in the order of the patterns); an empty glob is an error."""
    files: list[str] = []
    for pattern in patterns:
        check_remote(pattern, "--input")
        if "://" in pattern:
            root, _, rest = pattern.partition("://")
            bucket, _, tail = rest.partition("/")
            matches = sorted(str(p) for p in epath.Path(f"{root}://{bucket}").glob(tail))
        else:
            matches = sorted(p for p in globlib.glob(pattern, recursive=True) if epath.Path(p).is_file())
        if not matches:
            raise ConfigError(f"--input={pattern!r} matches no file")
        files += [m for m in matches if m not in files]
    return files


class Counter:
    """Records skipped with on_bad_record='skip' (reported by the caller)."""

    def __init__(self):
        self.skipped = 0


def read_documents(path: str, file_index: int, text_key: str = "text", fmt: str = "",
                   on_bad_record: str = "raise", bad: Counter | None = None) -> Iterator[Document]:
    """Streams the documents of one file."""
    fmt = format_of(path, fmt)
    bad = bad if bad is not None else Counter()
    if fmt == "parquet":
        yield from _parquet_documents(path, file_index, text_key, on_bad_record, bad)
    elif fmt.startswith("txt"):
        try:
            with _open_bytes(path, fmt) as f:
                data = f.read()
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
            raise SourceError(f"{path}: unreadable {fmt} file ({type(e).__name__}: {e})") from None
        yield Document(file_index, 0, data.decode("utf-8", "surrogateescape"))
    else:
        yield from _jsonl_documents(path, file_index, text_key, fmt, on_bad_record, bad)


def _bad(path: str, where: str, problem: str, on_bad_record: str, bad: Counter) -> None:
    if on_bad_record != "skip":
        raise SourceError(f"{path}{where}: {problem} (--on_bad_record=skip skips such records)")
    bad.skipped += 1


def _jsonl_documents(path: str, file_index: int, text_key: str, fmt: str, on_bad_record: str,
                     bad: Counter) -> Iterator[Document]:
    try:
        with _open_lines(path, fmt) as lines:
            for line_no, raw in enumerate(lines, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except ValueError as e:  # a pretty-printed .json file fails here: say how to read it whole
                    hint = "; a .json file is read as JSON lines, --format=txt reads it as one text" * (line_no == 1)
                    _bad(path, f":{line_no}", f"malformed JSON ({e}){hint}", on_bad_record, bad)
                    continue
                text = record.get(text_key) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    _bad(path, f":{line_no}", f"no string field {text_key!r} (--text_key)", on_bad_record, bad)
                    continue
                yield Document(file_index, line_no - 1, text)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
        raise SourceError(f"{path}: unreadable {fmt} stream ({type(e).__name__}: {e})") from None


def _open_bytes(path: str, fmt: str) -> io.RawIOBase:
    """The file's bytes, decompressed on the fly (by the format's `.gz` / `.zst` suffix)."""
    raw = epath.Path(path).open("rb")
    if fmt.endswith(".gz"):
        raw = gzip.GzipFile(fileobj=raw)
    elif fmt.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
    return raw


def _open_lines(path: str, fmt: str) -> io.TextIOBase:
    """A text stream of the file's lines, decompressed on the fly (bounded memory)."""
    return io.TextIOWrapper(_open_bytes(path, fmt), encoding="utf-8", errors="surrogateescape", newline="\n")


def _parquet_documents(path: str, file_index: int, text_key: str, on_bad_record: str,
                       bad: Counter) -> Iterator[Document]:
    try:
        handle = pq.ParquetFile(epath.Path(path).open("rb"))
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise SourceError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    if text_key not in handle.schema_arrow.names:
        raise SourceError(f"{path}: parquet file has no column {text_key!r} (--text_key); "
                          f"its columns: {', '.join(handle.schema_arrow.names)}")
    row = 0
    for batch in handle.iter_batches(columns=[text_key], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield Document(file_index, row, text)
            else:
                _bad(path, f": row {row}", f"column {text_key!r} is not a string ({text!r:.40})", on_bad_record, bad)
            row += 1


def sample_documents(files: Sequence[str], budget_bytes: int, text_key: str = "text", fmt: str = "",
                     on_bad_record: str = "raise") -> Iterator[str]:
    """A deterministic sample of about `budget_bytes` of text, streamed: the first documents of
    each file up to an equal share of the budget, so the sample spans every file."""
    share = max(1, budget_bytes // max(len(files), 1))
    for index, path in enumerate(files):
        taken = 0
        for doc in read_documents(path, index, text_key, fmt, on_bad_record):
            yield doc.text
            taken += len(doc.text.encode("utf-8", "surrogateescape"))
            if taken >= share:
                break
