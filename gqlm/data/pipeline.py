"""grain pipeline: a corpus's prepared splits -> packed rows -> host-local batches.

One reader for every text corpus: `data.corpus=prepared` reads the directories of `data.sources`
(python -m gqlm.prepare), and the built-in corpora (shakespeare, python_stdlib, text_files) are
prepared the same way on first use, into `<data_dir>/gqlm_prepared/<corpus, tokenizer key>`
(under a file lock; written aside and renamed into place whole). Reading, shuffling, mixing and
per-process rows are data/prepared.py's. Synthetic tasks generate their examples (synthetic.py).

Process p of P owns rows [p*B/P, (p+1)*B/P) of every global batch; `to_global` assembles them
with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import glob
import os
import shutil
from typing import Callable

import grain
import jax
import numpy as np

from gqlm import mesh as mesh_lib
from gqlm.config import ConfigDict, ConfigError
from gqlm.config.data import PREPARED, parse_sources
from gqlm.data import corpora, packing, prepared, synthetic
from gqlm.data.prepare import FORMAT_VERSION, META, SPLITS, prepare_documents
from gqlm.tokenizers.base import Tokenizer, fingerprint_of

Batch = dict[str, np.ndarray]


def builtin_prepared(data_config: ConfigDict, tokenizer: Tokenizer) -> str:
    """The prepared directory of a built-in corpus under this tokenizer, prepared on first use."""
    d = data_config
    splits = [s for s in SPLITS if corpora.has_split(d, s)]
    key = fingerprint_of(d.corpus, *(corpora.corpus_fingerprint(d, s) for s in splits), tokenizer.fingerprint(),
                         str(FORMAT_VERSION))  # a new format gets a new copy, not a refusal of the old
    root = os.path.join(corpora.data_dir_of(d), "gqlm_prepared")
    out = os.path.join(root, f"{d.corpus}-{key}")
    if not os.path.exists(os.path.join(out, META)):
        with corpora.file_lock(os.path.join(root, f"{d.corpus}-{key}.lock")):
            if not os.path.exists(os.path.join(out, META)):  # another process may have just made it
                for stale in glob.glob(f"{out}.tmp-*"):  # a killed first use's (we hold the lock)
                    shutil.rmtree(stale, ignore_errors=True)
                documents = ((text, s) for s in splits for text in corpora.load_documents(d, s))
                prepare_documents(out, tokenizer, d.tokenizer, documents, corpus=d.corpus, glob=d.glob)
    return out


def _sources(config: ConfigDict, tokenizer: Tokenizer) -> tuple[prepared.Sources, Callable[[str], str]]:
    """(directory, weight) of each source, and how errors name a source."""
    d = config.data
    if d.corpus == PREPARED:
        return parse_sources(d.sources), lambda directory: f"data.sources: {directory!r}"
    where = f" (data.glob={d.glob!r})" if d.corpus == "text_files" else ""
    return [(builtin_prepared(d, tokenizer), 1.0)], lambda directory: f"data.corpus={d.corpus!r}{where}"


def open_split(config: ConfigDict, tokenizer: Tokenizer, split: str) -> tuple[list[prepared.PreparedSplit], list[float]]:
    """The prepared `split` of each of the config's sources (built-in corpora: prepared first)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} for data.corpus={config.data.corpus!r}; expected one of "
                          f"{', '.join(SPLITS)}")
    sources, describe = _sources(config, tokenizer)
    return prepared.open_sources(sources, config.data.seq_len, tokenizer, split, describe)


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


def make_train_iterator(config: ConfigDict, tokenizer: Tokenizer, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
    """Host-local batches `[batch_size / process_count, seq_len]`, forever-ish (data.num_epochs)."""
    lo, hi = process_slice(config.data.batch_size, process_index, process_count)
    if synthetic.is_synthetic(config.data.corpus):
        return synthetic.make_train_iterator(config, tokenizer, lo, hi)
    splits, weights = open_split(config, tokenizer, "train")
    return prepared.make_train_iterator(config, tokenizer, splits, weights, lo, hi)


def make_eval_batches(config: ConfigDict, tokenizer: Tokenizer, split: str = "validation",
                      num_batches: int = 1, process_index: int | None = None,
                      process_count: int | None = None) -> list[Batch]:
    """The first `num_batches` global batches of `split`, in order, as host-local batches.
    Rows past the end of the split are padding (loss_mask 0); a short split gives fewer batches.
    Of a mixture of prepared sources: each source's batches, one source after the other."""
    sets = make_eval_sets(config, tokenizer, split, num_batches, process_index, process_count)
    return [batch for batches in sets.values() for batch in batches]


def make_eval_sets(config: ConfigDict, tokenizer: Tokenizer, split: str = "validation", num_batches: int = 1,
                   process_index: int | None = None, process_count: int | None = None) -> dict[str, list[Batch]]:
    """`make_eval_batches` per source: {source name: batches}."""
    d = config.data
    lo, hi = process_slice(d.batch_size, process_index, process_count)
    if synthetic.is_synthetic(d.corpus):
        return {d.corpus: synthetic.make_eval_batches(config, tokenizer, split, num_batches, lo, hi)}
    splits, _ = open_split(config, tokenizer, split)
    names = [s.name if [t.name for t in splits].count(s.name) == 1 else f"{s.name}_{i}" for i, s in enumerate(splits)]
    return {name: prepared.eval_batches(s, d.seq_len, d.batch_size, tokenizer.pad_id, num_batches, lo, hi)
            for name, s in zip(names, splits)}


def abstract_batch(config: ConfigDict, mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global `[B, T]` batch the train step receives, as sharded ShapeDtypeStructs."""
    sharding = mesh_lib.batch_sharding(mesh, config.mesh.rules)
    shape = (config.data.batch_size, config.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, dtype in packing.BATCH_DTYPES.items()}


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
    """Assembles every process's host-local rows into global `[B, T]` arrays (no replication)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
