"""grain pipeline: corpus split -> token stream (cached .npy) -> packed rows -> host-local batches.

Training: `MapDataset.range(rows).shuffle(seed).repeat(epochs)` (grain reshuffles every epoch)
-> `.batch(global_batch)` -> this process's slice of each global batch, packed -> an iterator
whose `get_state`/`set_state` restore the exact position (saved with orbax by the runner).
Process p of P owns rows [p*B/P, (p+1)*B/P) of every global batch; `to_global` assembles them
with `jax.make_array_from_process_local_data`.

The token stream of a split is built once per (corpus fingerprint, tokenizer fingerprint) and
cached as `[2, L]` int32 (tokens, document ids) under `<data_dir>/gqlm_tokens/`, written to a
temporary file and renamed, so concurrent first uses cannot leave a torn cache.
"""

from __future__ import annotations

import os
import tempfile

import grain
import jax
import numpy as np

from gqlm.config import ConfigDict, ConfigError
from gqlm.config.data import PREPARED
from gqlm.data import corpora, packing, prepared, synthetic
from gqlm.tokenizers.base import Tokenizer

_ENCODE_CHUNK = 32  # documents per encode_batch call


class TokenStream:
    """The cached `[2, L]` (tokens, doc_ids) array of a split; memory-mapped lazily, so the
    object pickles cheaply into grain worker processes."""

    def __init__(self, path: str):
        self.path = path
        self._array = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return self.array.shape[1]

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path, self._array = state["path"], None


def _encode_all(tokenizer: Tokenizer, docs) -> list[list[int]]:
    batch = getattr(tokenizer, "encode_batch", None)
    out = []
    for lo in range(0, len(docs), _ENCODE_CHUNK):
        texts = docs[lo:lo + _ENCODE_CHUNK]
        out += batch(texts) if batch else [tokenizer.encode(t) for t in texts]
    return out


def token_stream(data_config: ConfigDict, tokenizer: Tokenizer, split: str) -> TokenStream:
    """The split's token stream, built and cached on first use."""
    key = f"{data_config.corpus}-{split}-{corpora.corpus_fingerprint(data_config, split)}-{tokenizer.fingerprint()}"
    cache_dir = os.path.join(corpora.data_dir_of(data_config), "gqlm_tokens")
    path = os.path.join(cache_dir, key + ".npy")
    if not os.path.exists(path):
        docs = corpora.load_documents(data_config, split)
        tokens, doc_ids = packing.concat_documents(_encode_all(tokenizer, docs), tokenizer.bos_id, tokenizer.eos_id)
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.stack([tokens, doc_ids]))
        os.replace(tmp, path)
    return TokenStream(path)


class PackRows:
    """Maps a global batch of row indices to this process's packed rows (picklable)."""

    def __init__(self, stream: TokenStream, seq_len: int, pad_id: int, lo: int, hi: int):
        self.stream, self.seq_len, self.pad_id, self.lo, self.hi = stream, seq_len, pad_id, lo, hi

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        a = self.stream.array
        return packing.pack_rows(a[0], a[1], np.asarray(rows)[self.lo:self.hi], self.seq_len, self.pad_id)


def process_slice(batch_size: int, process_index: int | None = None, process_count: int | None = None,
                  key: str = "data.batch_size") -> tuple[int, int]:
    """This process's rows [lo, hi) of a global batch; `key` names the batch size in errors."""
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    if batch_size % n:
        raise ConfigError(f"{key}={batch_size} is not divisible by the {n} processes")
    if not 0 <= p < n:
        raise ValueError(f"process_index={p} outside [0, {n})")
    return p * batch_size // n, (p + 1) * batch_size // n


def _checked_stream(config: ConfigDict, tokenizer: Tokenizer, split: str) -> TokenStream:
    stream = token_stream(config.data, tokenizer, split)
    if len(stream) - 1 < config.data.seq_len:
        where = f" (data.glob={config.data.glob!r})" if config.data.corpus == "text_files" else ""
        raise ConfigError(f"data.corpus={config.data.corpus!r}{where} split {split!r} is empty or too small: "
                          f"{len(stream)} tokens, data.seq_len={config.data.seq_len} needs at least "
                          f"{config.data.seq_len + 1}")
    return stream


def make_train_iterator(config: ConfigDict, tokenizer: Tokenizer, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
    """Host-local batches `[batch_size / process_count, seq_len]`, forever-ish (data.num_epochs)."""
    d = config.data
    lo, hi = process_slice(d.batch_size, process_index, process_count)
    if synthetic.is_synthetic(d.corpus):
        return synthetic.make_train_iterator(config, tokenizer, lo, hi)
    if d.corpus == PREPARED:
        return prepared.make_train_iterator(config, tokenizer, lo, hi)
    stream = _checked_stream(config, tokenizer, "train")
    num_rows = packing.num_full_rows(len(stream), d.seq_len)
    ds = grain.MapDataset.range(num_rows).shuffle(seed=config.seed).repeat(d.num_epochs)
    ds = ds.batch(d.batch_size, drop_remainder=True)
    ds = ds.map(PackRows(stream, d.seq_len, tokenizer.pad_id, lo, hi))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if d.worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count))
    return iter(it)


def make_eval_batches(config: ConfigDict, tokenizer: Tokenizer, split: str = "validation",
                      num_batches: int = 1, process_index: int | None = None,
                      process_count: int | None = None) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` global batches of `split`, in order, as host-local batches.
    Rows past the end of the split are padding (loss_mask 0); a short split gives fewer batches.
    Of a mixture of prepared sources: each source's batches, one source after the other."""
    sets = make_eval_sets(config, tokenizer, split, num_batches, process_index, process_count)
    return [batch for batches in sets.values() for batch in batches]


def make_eval_sets(config: ConfigDict, tokenizer: Tokenizer, split: str = "validation", num_batches: int = 1,
                   process_index: int | None = None, process_count: int | None = None
                   ) -> dict[str, list[dict[str, np.ndarray]]]:
    """`make_eval_batches` per source: {source name: batches}; one set named by the corpus unless
    the corpus is a mixture of prepared sources (bits per byte are reported per source)."""
    d = config.data
    lo, hi = process_slice(d.batch_size, process_index, process_count)
    if d.corpus == PREPARED:
        return prepared.make_eval_sets(config, tokenizer, split, num_batches, lo, hi)
    return {d.corpus: _eval_batches(config, tokenizer, split, num_batches, lo, hi)}


def _eval_batches(config: ConfigDict, tokenizer: Tokenizer, split: str, num_batches: int, lo: int,
                  hi: int) -> list[dict[str, np.ndarray]]:
    d = config.data
    if synthetic.is_synthetic(d.corpus):
        return synthetic.make_eval_batches(config, tokenizer, split, num_batches, lo, hi)
    stream = _checked_stream(config, tokenizer, split)
    a = stream.array
    num_rows = packing.num_rows_covering(len(stream), d.seq_len)
    count = min(num_batches, -(-num_rows // d.batch_size))
    batches = []
    for b in range(count):
        rows = b * d.batch_size + np.arange(lo, hi)
        rows = np.where(rows < num_rows, rows, -1)
        batches.append(packing.pack_rows(a[0], a[1], rows, d.seq_len, tokenizer.pad_id))
    return batches


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
    """Assembles every process's host-local rows into global `[B, T]` arrays (no replication)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
