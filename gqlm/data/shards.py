"""The prepared-corpus file format: ArrayRecord shards of tokenized documents.

`OUT/<split>/<input:05d>-<part:04d>.array_record`: documents in input order, each as one or more
records of at most RECORD_TOKENS tokens (a long document is cut, so reading any window of the
stream reads a bounded amount). A record is an 8-byte little-endian count of UTF-8 bytes (the
document's bytes on its first record, 0 on the others), then its token ids as uint32 (no BOS or
EOS: the reader adds them). Beside each shard, `.index.npy` holds one row per record, int64:
  [0] the cumulative length of the shard's token stream `[bos] doc [eos] [bos] doc [eos] ...` after
      the record (a document counts its tokens + 2, its first record the BOS, its last the EOS);
  [1] the record's document, counted from the shard's first.
The reader memory-maps it to find the records of any window without reading the others. A shard
holds whole documents: a new part starts only between documents.

A shard is written to a temporary file and published by rename, so a shard's name never points
to a half-written file (on a bucket, a temporary local file is uploaded: objects appear whole).
"""
from __future__ import annotations

import os
import struct
import tempfile
from typing import NamedTuple

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

SHARD_SUFFIX = ".array_record"
INDEX_SUFFIX = ".index.npy"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access reads only that record
RECORD_TOKENS = 1 << 16  # 256 KiB of ids: a training row reads at most a few such records
_HEADER = struct.Struct("<Q")


def encode_record(ids: np.ndarray, num_bytes: int) -> bytes:
    return _HEADER.pack(num_bytes) + np.asarray(ids, np.uint32).tobytes()


def decode_record(record: bytes) -> tuple[np.ndarray, int]:
    """(token ids as int32, UTF-8 bytes of the document)."""
    (num_bytes,) = _HEADER.unpack_from(record)
    return np.frombuffer(record, np.uint32, offset=_HEADER.size).astype(np.int32), num_bytes


def shard_name(input_index: int, part: int) -> str:
    return f"{input_index:05d}-{part:04d}{SHARD_SUFFIX}"


class ShardStats(NamedTuple):
    name: str
    documents: int
    tokens: int
    bytes: int
    records: int


def stream_index(lengths: np.ndarray, documents: np.ndarray) -> np.ndarray:
    """The `.index.npy` rows of records with `lengths` tokens belonging to `documents` (module doc)."""
    first = np.r_[True, documents[1:] != documents[:-1]]
    last = np.r_[documents[1:] != documents[:-1], True]
    return np.stack([np.cumsum(lengths + first + last), documents], axis=1).astype(np.int64)


def publish(local: str, destination: str) -> None:
    """Moves a finished local file to its final name, atomically."""
    os.chmod(local, 0o644)  # mkstemp's 0600 would hide shards from other users of a shared disk
    if "://" in destination:
        epath.Path(local).copy(epath.Path(destination), overwrite=True)
        os.remove(local)
    else:
        os.replace(local, destination)


class ShardWriter:
    """Writes one split's shards for one input file, starting a new part past `max_bytes`."""

    def __init__(self, directory: str, input_index: int, max_bytes: int):
        self.directory, self.input_index, self.max_bytes = directory, input_index, max_bytes
        self.stats: list[ShardStats] = []
        self._writer = None

    def add(self, ids: np.ndarray, num_bytes: int, first: bool = True) -> None:
        """Appends a document's tokens (`first`: a new document; else more of the last one's)."""
        if first and self._writer is not None and self._size >= self.max_bytes:
            self._close()  # only between documents: a shard holds whole documents
        if self._writer is None:
            if not first:
                raise ValueError("a shard's first record must start a document")
            self._open()
        self._documents += first
        for start in range(0, max(len(ids), 1), RECORD_TOKENS):
            piece = ids[start:start + RECORD_TOKENS]
            record = encode_record(piece, num_bytes if start == 0 else 0)
            self._writer.write(record)
            self._lengths.append(len(piece))
            self._document_of.append(self._documents - 1)
            self._size += len(record)
        self._bytes += num_bytes

    def _open(self) -> None:
        # Beside the shard when local (a rename within one file system); hidden from any listing.
        local_dir = None if "://" in self.directory else self.directory
        fd, self._tmp = tempfile.mkstemp(suffix=SHARD_SUFFIX, prefix=".tmp-", dir=local_dir)
        os.close(fd)
        self._writer = ArrayRecordWriter(self._tmp, WRITER_OPTIONS)
        self._lengths, self._document_of, self._documents, self._bytes, self._size = [], [], 0, 0, 0

    def _close(self) -> None:
        self._writer.close()
        self._writer = None
        name = shard_name(self.input_index, len(self.stats))
        final = os.path.join(self.directory, name)
        index_tmp = self._tmp + INDEX_SUFFIX
        np.save(index_tmp, stream_index(np.asarray(self._lengths, np.int64), np.asarray(self._document_of, np.int64)))
        publish(index_tmp, final + INDEX_SUFFIX)  # the index first: a published shard always has one
        publish(self._tmp, final)
        self.stats.append(ShardStats(name, self._documents, int(sum(self._lengths)), self._bytes, len(self._lengths)))

    def finish(self) -> list[ShardStats]:
        if self._writer is not None:
            self._close()
        return self.stats

    def abort(self) -> None:
        """Removes the part being written (an error stopped the input)."""
        if self._writer is not None:
            self._writer.close()
            for path in (self._tmp, self._tmp + INDEX_SUFFIX):
                if os.path.exists(path):
                    os.remove(path)
            self._writer = None
