"""Training on prepared corpora (data/prepare.py): rows read on demand, weighted mixtures, grain.

A split of a prepared directory is one token stream, `[bos] doc [eos]` for each document in shard
order; row r is the window [r*T, r*T + T + 1) of it, packed with the batch contract of
packing.py. `PreparedSplit.window` finds a window's documents by binary search in the shards'
memory-mapped indexes and reads only those records, so memory does not grow with the corpus.

Training: per source, `MapDataset.range(rows).shuffle(seed).repeat(epochs)`, tagged with its
source; `MapDataset.mix` by `data.sources` weights (rows are T tokens each, so the weights are
token shares); `.batch(global batch)`; each process reads only rows [lo, hi) of every global
batch. The global batches do not depend on the process count, and the iterator's state (saved
with every checkpoint) resumes them exactly.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np
from etils import epath

from gqlm.config import ConfigDict, ConfigError
from gqlm.data import packing
from gqlm.data.prepare import FORMAT_VERSION, META
from gqlm.data.shards import INDEX_SUFFIX, decode_record
from gqlm.tokenizers.base import Tokenizer

Batch = dict[str, np.ndarray]


def read_meta(directory: str, tokenizer: Tokenizer) -> dict[str, Any]:
    """A prepared directory's meta.json, refused unless finished and made with `tokenizer`."""
    path = epath.Path(directory) / META
    if not path.exists():
        raise ConfigError(f"data.sources: {directory!r} is not a prepared corpus (no {META}; "
                          "prepare it with python -m gqlm.prepare, or finish an interrupted run)")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"data.sources: {directory!r} has format_version {meta.get('format_version')!r}; "
                          f"this gqlm reads {FORMAT_VERSION}")
    if meta["tokenizer_fingerprint"] != tokenizer.fingerprint():
        raise ConfigError(f"data.sources: {directory!r} was prepared with tokenizer {meta['tokenizer']!r} "
                          f"(fingerprint {meta['tokenizer_fingerprint']}), not data.tokenizer's "
                          f"(fingerprint {tokenizer.fingerprint()}); prepare it again with this tokenizer")
    return meta


class PreparedSplit:
    """One split of a prepared directory, read by windows of its token stream (picklable: the
    readers and memory maps are reopened in each grain worker)."""

    def __init__(self, directory: str, split: str, meta: dict[str, Any]):
        shards = meta["splits"][split]["shards"]
        self.name = os.path.basename(os.path.normpath(directory))  # in metric names: bpb/<name>
        self.paths = [str(epath.Path(directory) / s["name"]) for s in shards]
        docs = np.array([s["documents"] for s in shards], np.int64)
        self.doc_base = np.concatenate([[0], np.cumsum(docs)])
        self.record_base = np.concatenate([[0], np.cumsum([s["records"] for s in shards], dtype=np.int64)])
        tokens = np.array([s["tokens"] for s in shards], np.int64)
        self.shard_start = np.concatenate([[0], np.cumsum(tokens + 2 * docs)])  # each document adds BOS and EOS
        self.length = int(self.shard_start[-1])
        self.bos, self.eos = meta["bos_id"], meta["eos_id"]
        self._source, self._index = None, {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_source": None, "_index": {}}

    def index(self, shard: int) -> np.ndarray:
        """The shard's [records, 2] index (data/shards.py): stream end, document."""
        if shard not in self._index:
            self._index[shard] = np.load(self.paths[shard] + INDEX_SUFFIX, mmap_mode="r")
        return self._index[shard]

    def records(self, indices: Sequence[int]) -> list[np.ndarray]:
        """The token ids of records `indices` (counted over the split's shards)."""
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        return [decode_record(self._source[int(i)])[0] for i in indices]

    def _stream(self, shard: int, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, global document ids) of the shard's stream over its records first..last: BOS
        before a document's first record, EOS after its last."""
        docs, r = self.index(shard)[:, 1], np.arange(first, last + 1)
        n = len(docs)
        starts = (r == 0) | (docs[r] != docs[np.maximum(r - 1, 0)])
        ends = (r == n - 1) | (docs[r] != docs[np.minimum(r + 1, n - 1)])
        base = self.record_base[shard]
        parts = [np.concatenate([[self.bos]] * int(starts[k]) + [piece] + [[self.eos]] * int(ends[k])).astype(np.int32)
                 for k, piece in enumerate(self.records(range(base + first, base + last + 1)))]
        ids = [np.full(len(part), self.doc_base[shard] + docs[first + k], np.int64) for k, part in enumerate(parts)]
        return np.concatenate(parts), np.concatenate(ids)

    def window(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, document ids) of stream[start : start + length], shorter at the stream's end."""
        end, tokens, doc_ids = min(start + length, self.length), [], []
        pos = start
        while pos < end:
            shard = int(np.searchsorted(self.shard_start, pos, side="right")) - 1
            ends = self.index(shard)[:, 0]
            shard_start = self.shard_start[shard]
            local, local_end = pos - shard_start, min(end, self.shard_start[shard + 1]) - shard_start
            first = int(np.searchsorted(ends, local, side="right"))
            last = int(np.searchsorted(ends, local_end - 1, side="right"))
            stream, ids = self._stream(shard, first, last)
            item_start = int(ends[first - 1]) if first else 0
            lo, hi = local - item_start, local_end - item_start
            tokens.append(stream[lo:hi])
            doc_ids.append(ids[lo:hi])
            pos = shard_start + local_end
        if not tokens:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        return np.concatenate(tokens), np.concatenate(doc_ids)

    @property
    def num_documents(self) -> int:
        return int(self.doc_base[-1])

    @property
    def num_records(self) -> int:
        return int(self.record_base[-1])

    def rows(self, seq_len: int, full: bool = True) -> int:
        return packing.num_full_rows(self.length, seq_len) if full else packing.num_rows_covering(self.length, seq_len)


def pack_window_rows(split: PreparedSplit, rows: np.ndarray, seq_len: int, pad_id: int) -> Batch:
    """The batch dict of `rows` of one split (-1: a padding row)."""
    return window_rows(split, rows, seq_len, pad_id)[0]


def window_rows(split: PreparedSplit, rows: np.ndarray, seq_len: int, pad_id: int) -> tuple[Batch, np.ndarray]:
    """(the batch dict of `rows` (-1: a padding row), the document of each target [R, T]: the
    global document index of the window's token after each input position; 0 on padding)."""
    packed, target_doc_RT = [], np.zeros((len(rows), seq_len), np.int64)
    padding = (np.array([pad_id], np.int32), np.zeros(1, np.int64))  # pack_rows indexes it, masks all
    for r, row in enumerate(np.asarray(rows)):
        tokens, doc_ids = split.window(int(row) * seq_len, seq_len + 1) if row >= 0 else padding
        packed.append(packing.pack_rows(tokens, doc_ids, np.array([0 if row >= 0 else -1]), seq_len, pad_id))
        if row >= 0:
            target_doc_RT[r, :len(doc_ids) - 1] = doc_ids[1:]
    return {k: np.concatenate([p[k] for p in packed]) for k in packed[0]}, target_doc_RT


class TagSource:
    """grain map: row -> (source index, row) (a class, so grain workers can unpickle it)."""

    def __init__(self, source: int):
        self.source = source

    def __call__(self, row: int) -> tuple[int, int]:
        return self.source, row


class FetchRows:
    """grain map: a global batch of (source, row) pairs -> this process's packed rows."""

    def __init__(self, splits: list[PreparedSplit], seq_len: int, pad_id: int, lo: int, hi: int):
        self.splits, self.seq_len, self.pad_id, self.lo, self.hi = splits, seq_len, pad_id, lo, hi

    def __call__(self, batch: tuple[np.ndarray, np.ndarray]) -> Batch:
        source_B, row_B = (np.asarray(x)[self.lo:self.hi] for x in batch)
        out = None
        for s, split in enumerate(self.splits):
            mine = np.flatnonzero(source_B == s)
            if not len(mine):
                continue
            rows = pack_window_rows(split, row_B[mine], self.seq_len, self.pad_id)
            if out is None:
                out = {k: np.zeros((len(row_B),) + v.shape[1:], v.dtype) for k, v in rows.items()}
            for k, v in rows.items():
                out[k][mine] = v
        return out


Sources = list[tuple[str, float]]  # (prepared directory, weight)


def open_sources(sources: Sources, seq_len: int, tokenizer: Tokenizer, split: str,
                 describe: Callable[[str], str]) -> tuple[list[PreparedSplit], list[float]]:
    """The `split` of each source, and their weights; a split too short for one row is refused
    (`describe(directory)` names the source in that error)."""
    splits, weights = [], []
    for directory, weight in sources:
        source = PreparedSplit(directory, split, read_meta(directory, tokenizer))
        if source.length < seq_len + 1:
            raise ConfigError(f"{describe(directory)} split {split!r} is empty or too small: {source.length} "
                              f"tokens, data.seq_len={seq_len} needs at least {seq_len + 1}")
        splits.append(source)
        weights.append(weight)
    return splits, weights


def row_batches(splits: list[PreparedSplit], weights: list[float], config: ConfigDict) -> grain.MapDataset:
    """Global batches of (source, row) pairs: each source's rows shuffled, repeated, mixed by weight."""
    d = config.data
    per_source = [grain.MapDataset.range(s.rows(d.seq_len)).shuffle(seed=config.seed + i).repeat(d.num_epochs)
                  .map(TagSource(i)) for i, s in enumerate(splits)]
    ds = grain.MapDataset.mix(per_source, weights) if len(per_source) > 1 else per_source[0]
    return ds.batch(d.batch_size, drop_remainder=True)


def make_train_iterator(config: ConfigDict, tokenizer: Tokenizer, splits: list[PreparedSplit],
                        weights: list[float], lo: int, hi: int) -> grain.DatasetIterator:
    """Host-local batches (rows [lo, hi) of every global batch) of the mixture of `splits`."""
    d, batches = config.data, row_batches(splits, weights, config)
    if len(batches) < config.train.steps:  # else next() raised a bare StopIteration mid-run, at that batch
        raise ConfigError(f"data.num_epochs={d.num_epochs}: the training stream of {', '.join(s.name for s in splits)} "
                          f"ends after {len(batches)} batches of data.batch_size={d.batch_size}, before "
                          f"train.steps={config.train.steps}; raise data.num_epochs (a mixture ends when one "
                          "of its sources has been read num_epochs times)")
    ds = batches.map(FetchRows(splits, d.seq_len, tokenizer.pad_id, lo, hi))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if d.worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count))
    return iter(it)


def eval_batches(split: PreparedSplit, seq_len: int, batch_size: int, pad_id: int, num_batches: int, lo: int,
                 hi: int) -> list[Batch]:
    """The first `num_batches` global batches covering `split` (rows past its end are padding)."""
    num_rows = split.rows(seq_len, full=False)
    count = min(num_batches, -(-num_rows // batch_size))
    rows = [b * batch_size + np.arange(lo, hi) for b in range(count)]
    return [pack_window_rows(split, np.where(r < num_rows, r, -1), seq_len, pad_id) for r in rows]


def document_texts(splits: list[PreparedSplit], weights: list[float], tokenizer: Tokenizer,
                   chunk: int = 64) -> Iterator[str]:
    """The splits' documents as text (decoded with the tokenizer that prepared them; a document
    longer than a record comes in its records' pieces), interleaved so that each source's share of
    the characters read so far follows its weight: however early the reader stops (a GQ-VAE keeps a
    fixed number of pieces), the mixture holds. Deterministic."""
    next_record, read = [0] * len(splits), [0] * len(splits)
    live = [i for i, s in enumerate(splits) if s.num_records]
    while live:
        i = min(live, key=lambda j: (read[j] / weights[j], j))
        split, start = splits[i], next_record[i]
        next_record[i] = end = min(start + chunk, split.num_records)
        for ids in split.records(range(start, end)):
            text = tokenizer.decode(ids.tolist())
            read[i] += len(text)
            yield text
        if end == split.num_records:
            live.remove(i)
