"""Bits per byte: the one number that compares language models across tokenizers (the loop's evaluation).

bpb = (summed target cross-entropy in nats) / (ln 2 x UTF-8 bytes of those targets). Special
tokens (BOS/EOS) have zero bytes but their loss still counts, so a model cannot hide cost in them.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np

from gqlm import mesh as mesh_lib
from gqlm.data.pipeline import to_global


def bits_per_byte(ce_sum_nats: float, num_bytes: float) -> float:
    return ce_sum_nats / (math.log(2) * max(num_bytes, 1.0))


def evaluate(eval_step: Callable, params: Any, batches: list[dict[str, np.ndarray]], mesh, rules) -> dict[str, float]:
    """Validation loss (nats per target token) and bits per byte over host-local batches."""
    sharding = mesh_lib.batch_sharding(mesh, rules)
    totals = {"ce_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
    for batch in batches:
        sums = jax.device_get(eval_step(params, to_global(batch, sharding)))
        totals = {k: totals[k] + float(sums[k]) for k in totals}
    return {"loss": totals["ce_sum"] / max(totals["tokens"], 1.0),
            "bpb": bits_per_byte(totals["ce_sum"], totals["bytes"]),
            "bytes_per_token": totals["bytes"] / max(totals["tokens"], 1.0)}
