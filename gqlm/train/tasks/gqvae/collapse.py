"""Collapse of a GQ-VAE's gate: the definition, and a monitor that warns while training.

A gate has collapsed when its segmentation no longer depends on it in the way a tokenizer needs:
- to pretokens: it (almost) never cuts inside a 3-10-byte pretoken piece (share of such pieces
  cut inside < `PRETOKEN_CUT_FLOOR`): tokens end only where they are forced (piece ends, every
  `max_token_len` bytes), so the vocabulary is the most frequent pretokens;
- to bytes: mean token length < `BYTE_TOKEN_LEN` bytes: nearly every byte is its own token.
Both are judged on a window of logged metrics, all of which must agree, so one noisy log (or the
first steps, where the gate has not yet picked a side) does not count. A healthy run (the GPU
`:paper` runs: 2.9-3.2-byte tokens) cuts most 3-10-byte pieces and is far from both thresholds.

`pretoken_cut_share` and `mean_token_len` are metrics of the train step and the evaluation
(loss.py); `collapse_state` is the same test for the monitor, the benchmark and the docs.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

OK, TO_PRETOKENS, TO_BYTES = "ok", "collapsing to pretokens", "collapsing to bytes"
PRETOKEN_CUT_FLOOR = 0.05  # below: the gate alone (almost) never ends a token inside a pretoken
BYTE_TOKEN_LEN = 1.5  # below: (almost) every byte is a token (the observed collapse: 1.2 bytes)
WINDOW = 3  # logged steps that must all agree
MIN_STEP = 20  # the gate picks its side in the first ~10-20 steps; earlier logs say nothing


def collapse_state(pretoken_cut_share: Sequence[float], mean_token_len: Sequence[float]) -> str:
    """OK, TO_PRETOKENS or TO_BYTES for a window of metrics (one value per logged step)."""
    cut_W, len_W = np.asarray(pretoken_cut_share, float), np.asarray(mean_token_len, float)
    if not len(cut_W) or cut_W.shape != len_W.shape:
        raise ValueError(f"need two equally long, non-empty windows, got {cut_W.shape} and {len_W.shape}")
    if np.all(cut_W < PRETOKEN_CUT_FLOOR):
        return TO_PRETOKENS
    if np.all(len_W < BYTE_TOKEN_LEN):
        return TO_BYTES
    return OK


class CollapseMonitor:
    """Feeds logged train metrics to `collapse_state` over the last WINDOW logs from MIN_STEP on;
    `update` returns a warning line when the verdict turns to a collapse (or back to OK), else None."""

    def __init__(self, window: int = WINDOW, min_step: int = MIN_STEP):
        self.window, self.min_step = window, min_step
        self.rows: list[tuple[float, float]] = []
        self.state = OK

    def update(self, step: int, metrics: Mapping[str, float]) -> str | None:
        if step < self.min_step or "pretoken_cut_share" not in metrics:
            return None
        self.rows = (self.rows + [(metrics["pretoken_cut_share"], metrics["mean_token_len"])])[-self.window:]
        if len(self.rows) < self.window:
            return None
        cut_W, len_W = zip(*self.rows)
        state, previous = collapse_state(cut_W, len_W), self.state
        self.state = state
        if state == previous:
            return None
        if state == OK:
            return f"GQ-VAE gate recovered (over the last {self.window} logs)"
        return (f"GQ-VAE gate {state}: over the last {self.window} logs {min(cut_W):.3f}-{max(cut_W):.3f} of "
                f"3-10-byte pretokens cut inside, mean token {min(len_W):.2f}-{max(len_W):.2f} bytes, mean gate "
                f"{metrics.get('mean_gate', float('nan')):.3f} (docs/gqvae.md: collapse)")
