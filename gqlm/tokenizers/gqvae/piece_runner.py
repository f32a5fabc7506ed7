"""PieceRunner: byte pieces -> where their segments end (and the codes there), through a jitted
segmenter in fixed batch shapes, dispatched from worker threads (one per device) while the caller
goes on pretokenizing, and spread over the model's devices.

Shapes: R rows (pieces) per batch, L a bucket's padded piece length.

A piece of n bytes runs in the bucket L = bucket_of[n], in a batch of R = `rows_for(L)` rows; a
batch is dispatched as soon as it is full, each bucket's last, partial one at `results()`. R is
fixed per bucket because XLA:CPU's result for a row can depend on how many rows its batch has
(with R/2 rows, 4 of the 66k Shakespeare pretokens were cut differently by a 4,096-code model):
with one shape per bucket, a piece's result does not depend on what else is encoded. The model
is compute-bound on CPU (~1 MFLOP per byte position for 4,096 codes) and XLA:CPU runs one
device's calls one after another, so batches are spread over the devices given (one per core):
bucket L's k-th batch runs on device (L + k) mod devices, so a bucket with one batch always runs on
the same device and small encodes compile each shape once, not once per device.
"""

from __future__ import annotations

import collections
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

import jax
import numpy as np

from gqlm.tokenizers.gqvae.pretokenize import pack_pieces

POSITIONS = 256  # byte positions per batch: as fast per position as 512, less padding in last batches


def rows_for(length: int) -> int:
    """The rows of every batch of bucket `length`."""
    return max(1, POSITIONS // length)


class PieceRunner:
    """`add` pieces, then `results()`: for each piece in order, (the positions where its segments
    end, the codes there; codes are -1 when `fn` returns the ends alone). `fn(params, bytes_RL,
    lengths_R)` returns ends [R, L] (bool), or (ends, codes [R, L]) with `with_codes`; `params` is
    one of `params_per_device`. `threaded=False` runs `fn` at once, in the caller's thread."""

    def __init__(self, fn: Callable[..., Any], params_per_device: Sequence[Any], bucket_of: Sequence[int],
                 with_codes: bool, threaded: bool = True):
        self._fn, self._params, self._bucket_of, self._with_codes = fn, params_per_device, bucket_of, with_codes
        self._pieces: list[bytes] = []
        self._waiting: dict[int, list[int]] = collections.defaultdict(list)  # bucket -> piece indices
        self._batches: list[tuple[list[int], Future]] = []
        self._sent: dict[int, int] = collections.defaultdict(int)  # bucket -> batches dispatched
        # One dispatching thread per device (a call can wait in the thread that makes it); none
        # for a cheap `fn` (NumPy), run at once.
        self._pool = ThreadPoolExecutor(len(params_per_device), "gqvae-segment") if threaded else None

    def __enter__(self) -> "PieceRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def add(self, piece: bytes) -> int:
        """Queues `piece` (1 to max_pretoken_len bytes); returns its index in `results()`."""
        index = len(self._pieces)
        self._pieces.append(piece)
        length = self._bucket_of[len(piece)]
        waiting = self._waiting[length]
        waiting.append(index)
        if len(waiting) == rows_for(length):
            self._submit(length, waiting)
            self._waiting[length] = []
        return index

    def _submit(self, length: int, members: list[int]) -> None:
        chunk = [self._pieces[i] for i in members]
        params = self._params[(length + self._sent[length]) % len(self._params)]
        self._sent[length] += 1
        if self._pool is not None:
            self._batches.append((members, self._pool.submit(self._run, params, chunk, length)))
        else:
            done: Future = Future()
            done.set_result(self._run(params, chunk, length))
            self._batches.append((members, done))

    def _run(self, params: Any, chunk: list[bytes], length: int) -> Any:
        """Dispatches one batch (on the device holding `params`); its result is read later."""
        bytes_RL, lengths_R = pack_pieces(chunk, length, rows_for(length))
        return self._fn(params, bytes_RL, lengths_R)

    def results(self) -> list[tuple[list[int], list[int]]]:
        for length, members in sorted(self._waiting.items()):
            if members:  # the bucket's last, partial batch
                self._submit(length, members)
        self._waiting.clear()
        out: list[Any] = [None] * len(self._pieces)
        for members, future in self._batches:
            fetched = jax.device_get(future.result())
            ends_RL, codes_RL = fetched if self._with_codes else (fetched, None)
            rows_E, cols_E = np.nonzero(ends_RL[:len(members)])
            picked = codes_RL[rows_E, cols_E].tolist() if codes_RL is not None else [-1] * len(cols_E)
            bounds = np.searchsorted(rows_E, np.arange(len(members) + 1)).tolist()
            cols = cols_E.tolist()
            for r, i in enumerate(members):
                out[i] = (cols[bounds[r]:bounds[r + 1]], picked[bounds[r]:bounds[r + 1]])
        self._batches.clear()
        return out
