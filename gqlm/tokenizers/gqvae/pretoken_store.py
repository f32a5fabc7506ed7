"""PretokenIds: pretoken -> its token ids, stored flat so a text's ids are one NumPy gather.

Encoding a text is: pretokens -> their slots (one dict lookup each, -1 when unknown) -> the ids of
all slots at once (`gather`). Slots keep insertion order; the first ones can be saved as the
tokenizer's pretoken table (`arrays`) and later ones dropped again (`truncate`), which is how the
run-time cache stays bounded. The arrays are the table file's format: the pretokens' bytes
(`text_to_bytes`) with their lengths, the ids with their counts.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from gqlm.tokenizers.base import bytes_to_text, text_to_bytes


class PretokenIds:
    def __init__(self) -> None:
        self.slot: dict[str, int] = {}
        self.keys: list[str] = []
        self._starts = np.zeros(1024, np.int64)  # slot -> offset of its ids in _flat
        self._lens = np.zeros(1024, np.int64)
        self._flat = np.zeros(1 << 14, np.int32)
        self._used = 0  # ids in _flat

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, entries: dict[str, Sequence[int]]) -> None:
        """New pretokens (absent so far), in the dict's order."""
        if not entries:
            return
        lens = np.fromiter(map(len, entries.values()), np.int64, len(entries))
        ids = np.fromiter(itertools.chain.from_iterable(entries.values()), np.int32, int(lens.sum()))
        self._append(list(entries), lens, ids)

    def _append(self, keys: list[str], lens: np.ndarray, ids: np.ndarray) -> None:
        n, m = len(self.keys), len(keys)
        self._starts, self._lens = _grown(self._starts, n + m), _grown(self._lens, n + m)
        self._flat = _grown(self._flat, self._used + len(ids))
        self._lens[n:n + m] = lens
        self._starts[n:n + m] = self._used + np.cumsum(lens) - lens
        self._flat[self._used:self._used + len(ids)] = ids
        self._used += len(ids)
        self.slot.update(zip(keys, range(n, n + m)))
        self.keys.extend(keys)

    def truncate(self, n: int) -> None:
        """Keeps the first `n` slots."""
        for key in self.keys[n:]:
            del self.slot[key]
        del self.keys[n:]
        self._used = int(self._starts[n - 1] + self._lens[n - 1]) if n else 0

    def lookup(self, pretokens: Sequence[str]) -> np.ndarray:
        """[N] int64 slots, -1 for unknown pretokens."""
        return np.fromiter(map(self.slot.get, pretokens, itertools.repeat(-1)), np.int64, len(pretokens))

    def gather(self, slots: np.ndarray) -> list[int]:
        """The concatenated ids of `slots` (all known)."""
        lens = self._lens[slots]
        ends = np.cumsum(lens)
        offsets = np.repeat(self._starts[slots] - (ends - lens), lens) + np.arange(int(ends[-1]) if len(ends) else 0)
        return self._flat[offsets].tolist()

    def ids(self, key: str) -> list[int]:
        s = self.slot[key]
        return self._flat[self._starts[s]:self._starts[s] + self._lens[s]].tolist()

    def as_dict(self, n: int | None = None) -> dict[str, list[int]]:
        return {k: self.ids(k) for k in self.keys[:n]}

    def arrays(self, n: int) -> dict[str, np.ndarray]:
        """The first `n` slots as the table file's arrays."""
        keys = [text_to_bytes(p) for p in self.keys[:n]]
        used = int(self._starts[n - 1] + self._lens[n - 1]) if n else 0
        return {"pretoken_bytes": np.frombuffer(b"".join(keys), np.uint8),
                "pretoken_lengths": np.array([len(k) for k in keys], np.int64),
                "ids": self._flat[:used].copy(), "id_counts": self._lens[:n].copy()}

    def add_arrays(self, arrays: dict[str, np.ndarray], id_bytes: Sequence[bytes], first_learned: int) -> None:
        """Appends a table file's entries after checking that each entry's ids spell its pretoken
        (losslessness must not rest on a file) and that none is a special id (256 up to
        `first_learned`): ValueError otherwise."""
        blob, key_len = arrays["pretoken_bytes"].tobytes(), np.asarray(arrays["pretoken_lengths"], np.int64)
        ids, id_counts = np.asarray(arrays["ids"]), np.asarray(arrays["id_counts"], np.int64)
        if len(id_counts) != len(key_len) or int(key_len.sum()) != len(blob) or int(id_counts.sum()) != len(ids):
            raise ValueError("array lengths disagree")
        if len(ids) and ((ids < 0) | (ids >= len(id_bytes)) | ((ids >= 256) & (ids < first_learned))).any():
            raise ValueError("an id outside the vocabulary")
        if (id_counts < 1).any() or (key_len < 1).any():
            raise ValueError("an empty entry")
        if not len(ids):
            return
        id_starts = np.cumsum(id_counts) - id_counts
        sizes = np.array([len(b) for b in id_bytes], np.int64)
        # Same bytes overall and same length per entry: then every entry spells its own pretoken.
        if not np.array_equal(np.add.reduceat(sizes[ids], id_starts), key_len) or \
                b"".join(map(id_bytes.__getitem__, ids.tolist())) != blob:
            raise ValueError("ids that do not spell their pretokens")
        key_ends = np.cumsum(key_len).tolist()
        keys = [bytes_to_text(blob[a:b]) for a, b in zip([0] + key_ends[:-1], key_ends)]
        if len(set(keys)) != len(keys) or any(k in self.slot for k in keys):
            raise ValueError("a pretoken listed twice")
        self._append(keys, id_counts, ids.astype(np.int32))


def _grown(a: np.ndarray, need: int) -> np.ndarray:
    if need <= len(a):
        return a
    out = np.zeros(max(need, 2 * len(a)), a.dtype)
    out[:len(a)] = a
    return out

