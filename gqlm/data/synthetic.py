"""Synthetic tasks generated on the fly, packed through the same batch contract as any corpus.

`data.corpus = "synthetic:TASK"`. An example is a (prompt, answer) pair of ASCII strings whose
size is its *length* n (what length-generalization experiments vary):

  copy      n random lowercase letters, then "|"; answer: the same letters    "qwhk|" -> "qwhk"
  recall    n unique 3-letter keys with 3-digit values (a phonebook), then a queried key
                                                        "abc:123,xyz:905;xyz=" -> "905"
  parity    n random bits, then "="; answer: the parity of the bits at k secret positions
            (fixed by data.synthetic_seed, all < data.synthetic_min_len)   "0110101=" -> "1"
  addition  two zero-padded n-digit numbers; answer: their sum, zero-padded to n + 1 digits
                                                        "4821+0937=" -> "05758"
  phonebook a FIXED book of data.synthetic_phonebook_size (4-letter name, number) entries, drawn
            once from data.synthetic_seed (distinct names; each number's digit count uniform in
            [min_len, max_len]); an example queries one entry, uniformly    "qwhk:" -> "4821"
            Train and validation draw queries from the same book (memorization, not generalization);
            `length_batches(n)` holds every entry with an n-digit number exactly once, so accuracy
            is the fraction of the book memorized. An entry's length is its number's digits.

Each example is tokenized as `[bos] + encode(prompt) + encode(answer) + [eos]`; whole examples
are packed greedily into rows of `seq_len + 1` tokens (never split across rows), and `loss_mask`
is 1 only where the target is an answer token. Row r of a split is a pure function of
(data.synthetic_seed, split, r), so the stream is deterministic, random-access and resumable
through grain's iterator state like a corpus. Train and validation lengths are uniform in
[data.synthetic_min_len, data.synthetic_max_len]; `length_batches` fixes n (for evaluation).
"""

from __future__ import annotations

import functools
import string
from typing import Callable, Iterable, NamedTuple

import grain
import numpy as np

from gqlm.config import ConfigDict, ConfigError
from gqlm.config.data import (PHONEBOOK_NAMES, SYNTHETIC_PREFIX, SYNTHETIC_TASKS, check_corpus, check_parity_k,
                              check_phonebook_size)
from gqlm.data import packing
from gqlm.tokenizers.base import Tokenizer

PREFIX = SYNTHETIC_PREFIX
_SPLIT_IDS = {"train": 0, "validation": 1}
_LENGTH_SPLIT_ID = 2  # evaluation rows at one fixed length
_LETTERS = np.array(list(string.ascii_lowercase))
_DIGITS = np.array(list(string.digits))
_ROWS_PER_EPOCH = 2**62  # an endless stream: grain only ever materialises the rows it reads


def is_synthetic(corpus: str) -> bool:
    return corpus.startswith(PREFIX)


def task_of(corpus: str) -> str:
    check_corpus(corpus)
    if not is_synthetic(corpus):
        raise ConfigError(f"data.corpus={corpus!r} is not one of {', '.join(PREFIX + t for t in SYNTHETIC_TASKS)}")
    return corpus.removeprefix(PREFIX)


class Spec(NamedTuple):
    """What determines a task's examples."""
    task: str
    min_len: int
    max_len: int
    seed: int
    parity_k: int
    phonebook_size: int = 0

    @classmethod
    def from_config(cls, d: ConfigDict) -> "Spec":
        return cls(task_of(d.corpus), int(d.synthetic_min_len), int(d.synthetic_max_len),
                   int(d.synthetic_seed), int(d.synthetic_parity_k), int(d.synthetic_phonebook_size))


def parity_positions(spec: Spec) -> np.ndarray:
    """The k secret bit positions of sparse parity (sorted, all < min_len, fixed by the seed)."""
    check_parity_k(spec.parity_k, spec.min_len)
    rng = np.random.default_rng([spec.seed, 7919])
    return np.sort(rng.choice(spec.min_len, spec.parity_k, replace=False))


@functools.lru_cache(maxsize=8)
def phonebook(spec: Spec) -> tuple[tuple[str, str], ...]:
    """The fixed book: (name, number) entries, a pure function of (seed, size, min_len, max_len)."""
    check_phonebook_size(spec.phonebook_size)
    rng = np.random.default_rng([spec.seed, 4391])
    codes = rng.choice(PHONEBOOK_NAMES, spec.phonebook_size, replace=False)  # distinct names
    letters_NL = _LETTERS[codes[:, None] // 26 ** np.arange(3, -1, -1)[None, :] % 26]
    digits = rng.integers(spec.min_len, spec.max_len + 1, spec.phonebook_size)
    return tuple(("".join(name), "".join(rng.choice(_DIGITS, int(n)))) for name, n in zip(letters_NL, digits))


# ----------------------------------------------------------------------------- the tasks


def _copy(rng: np.random.Generator, n: int, spec: Spec) -> tuple[str, str]:
    s = "".join(rng.choice(_LETTERS, n))
    return s + "|", s


def _recall(rng: np.random.Generator, n: int, spec: Spec) -> tuple[str, str]:
    codes = rng.choice(26**3, n, replace=False)  # unique keys
    keys = ["".join(_LETTERS[[c // 676, c // 26 % 26, c % 26]]) for c in codes]
    values = ["".join(rng.choice(_DIGITS, 3)) for _ in range(n)]
    q = int(rng.integers(n))
    return ",".join(f"{k}:{v}" for k, v in zip(keys, values)) + f";{keys[q]}=", values[q]


def _parity(rng: np.random.Generator, n: int, spec: Spec) -> tuple[str, str]:
    bits = rng.integers(0, 2, n)
    return "".join(map(str, bits)) + "=", str(int(bits[parity_positions(spec)].sum() % 2))


def _addition(rng: np.random.Generator, n: int, spec: Spec) -> tuple[str, str]:
    a, b = ("".join(rng.choice(_DIGITS, n)) for _ in range(2))
    return f"{a}+{b}=", str(int(a) + int(b)).zfill(n + 1)


def _phonebook(rng: np.random.Generator, n: int, spec: Spec) -> tuple[str, str]:
    del n  # an entry's number length is fixed by the book
    name, number = phonebook(spec)[int(rng.integers(spec.phonebook_size))]
    return name + ":", number


TASKS: dict[str, Callable[[np.random.Generator, int, Spec], tuple[str, str]]] = {
    "copy": _copy, "recall": _recall, "parity": _parity, "addition": _addition, "phonebook": _phonebook}


def make_example(spec: Spec, rng: np.random.Generator, n: int) -> tuple[str, str]:
    return TASKS[spec.task](rng, n, spec)


def examples(spec: Spec, split: str, row: int, n: int | None = None, count: int = 1) -> list[tuple[str, str]]:
    """`count` examples from the start of `row`'s generator (what `pack_row` draws first)."""
    rng = _row_rng(spec, split, row, n)
    return [make_example(spec, rng, n or int(rng.integers(spec.min_len, spec.max_len + 1)))
            for _ in range(count)]


# ----------------------------------------------------------------------------- packing


def _row_rng(spec: Spec, split: str, row: int, n: int | None) -> np.random.Generator:
    split_id = _LENGTH_SPLIT_ID if n is not None else _SPLIT_IDS[split]
    return np.random.default_rng([spec.seed, split_id, n or 0, row])


def _encode(tokenizer: Tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    p, a = tokenizer.encode(prompt), tokenizer.encode(answer)
    return [tokenizer.bos_id] + p + a + [tokenizer.eos_id], [0] * (1 + len(p)) + [1] * len(a) + [0]


def pack_row(spec: Spec, tokenizer: Tokenizer, seq_len: int, split: str, row: int,
             n: int | None = None) -> dict[str, np.ndarray]:
    """One packed row `[1, seq_len]`: whole examples drawn until the next one would not fit.
    `n` fixes every example's length (evaluation); None draws it from [min_len, max_len]."""
    rng = _row_rng(spec, split, row, n)
    draws = (make_example(spec, rng, n or int(rng.integers(spec.min_len, spec.max_len + 1)))
             for _ in range(seq_len + 1))  # an example has >= 2 tokens, so the row fills before this ends
    return _pack_examples(spec, tokenizer, seq_len, draws, f"length {n or 'up to ' + str(spec.max_len)}")[0]


def _pack_examples(spec: Spec, tokenizer: Tokenizer, seq_len: int, pairs: Iterable[tuple[str, str]],
                   what: str) -> tuple[dict[str, np.ndarray], int]:
    """(row `[1, seq_len]`, examples used): `pairs` in order until the next would not fit."""
    tokens, doc_ids, answer = [], [], []
    used = 0
    for example, pair in enumerate(pairs):
        ids, is_answer = _encode(tokenizer, *pair)
        if len(tokens) + len(ids) > seq_len + 1:
            if not tokens:
                raise ConfigError(f"data.seq_len={seq_len} is too short for one {PREFIX}{spec.task} example "
                                  f"of {len(ids)} tokens ({what})")
            break
        doc_ids += [example] * len(ids)
        tokens += ids
        answer += is_answer
        used += 1
    if not tokens:  # nothing left: a padding row
        return packing.pack_rows(np.zeros(1, np.int32), np.zeros(1, np.int32), np.full(1, -1),
                                 seq_len, tokenizer.pad_id), 0
    batch = packing.pack_rows(np.asarray(tokens, np.int32), np.asarray(doc_ids, np.int32), np.zeros(1, np.int64),
                              seq_len, tokenizer.pad_id)
    answer_T = np.zeros(seq_len, np.float32)
    answer_T[:len(answer) - 1] = answer[1:]  # the target at t is stream token t + 1
    batch["loss_mask"] = batch["loss_mask"] * answer_T[None]
    return batch, used


def pack_rows(spec: Spec, tokenizer: Tokenizer, seq_len: int, split: str, rows: np.ndarray,
              n: int | None = None) -> dict[str, np.ndarray]:
    """The batch dict `[R, seq_len]` of several rows."""
    parts = [pack_row(spec, tokenizer, seq_len, split, int(r), n) for r in rows]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def example_tokens(spec: Spec, tokenizer: Tokenizer, n: int) -> int:
    """Tokens of one length-n example (exact for the byte tokenizer, whose example sizes depend
    only on n; a sample for others)."""
    if spec.task == "phonebook":  # the book's own draw need not have length n
        return len(_encode(tokenizer, "a" * 4 + ":", "0" * n)[0])
    return len(_encode(tokenizer, *make_example(spec, np.random.default_rng(0), n))[0])


def row_len_for(spec: Spec, tokenizer: Tokenizer, n: int, seq_len: int) -> int:
    """A row length holding at least one length-n example: seq_len, or more for long examples."""
    return max(seq_len, example_tokens(spec, tokenizer, n) - 1)


# ----------------------------------------------------------------------------- pipeline entry points


class _PackBatch:
    """Maps a global batch of row indices to this process's packed rows (picklable)."""

    def __init__(self, spec: Spec, tokenizer: Tokenizer, seq_len: int, split: str, lo: int, hi: int):
        self.spec, self.tokenizer, self.seq_len, self.split, self.lo, self.hi = spec, tokenizer, seq_len, split, lo, hi

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return pack_rows(self.spec, self.tokenizer, self.seq_len, self.split, np.asarray(rows)[self.lo:self.hi])


def _checked_spec(config: ConfigDict, tokenizer: Tokenizer) -> Spec:
    spec = Spec.from_config(config.data)
    need = example_tokens(spec, tokenizer, spec.max_len) - 1
    if need > config.data.seq_len:
        raise ConfigError(f"data.seq_len={config.data.seq_len} is too short for {config.data.corpus!r} examples of "
                          f"data.synthetic_max_len={spec.max_len} ({need + 1} tokens)")
    if spec.task == "parity":
        parity_positions(spec)
    if spec.task == "phonebook":
        phonebook(spec)
    return spec


def make_train_iterator(config: ConfigDict, tokenizer: Tokenizer, lo: int, hi: int) -> grain.DatasetIterator:
    """Host-local training batches (rows [lo, hi) of every global batch), endless and resumable."""
    d = config.data
    spec = _checked_spec(config, tokenizer)
    ds = grain.MapDataset.range(_ROWS_PER_EPOCH).batch(d.batch_size, drop_remainder=True)
    ds = ds.map(_PackBatch(spec, tokenizer, d.seq_len, "train", lo, hi))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if d.worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count))
    return iter(it)


def make_eval_batches(config: ConfigDict, tokenizer: Tokenizer, split: str, num_batches: int,
                      lo: int, hi: int) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` global batches of `split` ('train' | 'validation'), host-local rows."""
    if split not in _SPLIT_IDS:
        raise ConfigError(f"unknown split {split!r} for data.corpus={config.data.corpus!r}; "
                          f"expected one of {', '.join(_SPLIT_IDS)}")
    spec, b = _checked_spec(config, tokenizer), config.data.batch_size
    return [pack_rows(spec, tokenizer, config.data.seq_len, split, i * b + np.arange(lo, hi))
            for i in range(num_batches)]


def check_length(spec: Spec, n: int) -> None:
    """Raises ConfigError unless the task has examples of length n (parity reads its secret bits)."""
    if n < 1:
        raise ConfigError(f"length {n} must be >= 1")
    if spec.task == "parity" and n <= int(parity_positions(spec).max()):
        raise ConfigError(f"length {n} is too short for {PREFIX}parity: its secret bit positions "
                          f"{parity_positions(spec).tolist()} need length >= {int(parity_positions(spec).max()) + 1} "
                          f"(data.synthetic_min_len={spec.min_len} always is)")
    if spec.task == "recall" and n > 26**3:
        raise ConfigError(f"length {n} exceeds the {26**3} distinct 3-letter keys of {PREFIX}recall")
    if spec.task == "phonebook" and not any(len(number) == n for _, number in phonebook(spec)):
        raise ConfigError(f"length {n}: no {PREFIX}phonebook entry has an {n}-digit number (numbers have "
                          f"data.synthetic_min_len={spec.min_len} to data.synthetic_max_len={spec.max_len} digits)")


def lengths_of(spec: Spec) -> list[int]:
    """The number lengths present in the phonebook (its evaluation buckets)."""
    return sorted({len(number) for _, number in phonebook(spec)})


def length_batches(config: ConfigDict, tokenizer: Tokenizer, n: int, num_batches: int, lo: int, hi: int
                   ) -> list[dict[str, np.ndarray]]:
    """Evaluation batches whose every example has length n (rows long enough for one example).
    Phonebook: every book entry with an n-digit number exactly once, whatever num_batches."""
    spec, b = Spec.from_config(config.data), config.data.batch_size
    check_length(spec, n)
    seq_len = row_len_for(spec, tokenizer, n, config.data.seq_len)
    if spec.task == "phonebook":
        return [{k: v[lo:hi] for k, v in batch.items()} for batch in book_batches(spec, tokenizer, n, seq_len, b)]
    return [pack_rows(spec, tokenizer, seq_len, "eval", i * b + np.arange(lo, hi), n) for i in range(num_batches)]


def book_batches(spec: Spec, tokenizer: Tokenizer, n: int, seq_len: int, batch_size: int
                 ) -> list[dict[str, np.ndarray]]:
    """Global batches `[batch_size, seq_len]` holding the book's n-digit entries once each, in book
    order (the last batch padded with empty rows)."""
    entries = [(name + ":", number) for name, number in phonebook(spec) if len(number) == n]
    rows, at = [], 0
    while at < len(entries) or len(rows) % batch_size:
        row, used = _pack_examples(spec, tokenizer, seq_len, entries[at:], f"length {n}")
        rows.append(row)
        at += used
    return [{k: np.concatenate([r[k] for r in rows[i:i + batch_size]]) for k in rows[0]}
            for i in range(0, len(rows), batch_size)]
