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

Totals = dict[str, float]


def bits_per_byte(ce_sum_nats: float, num_bytes: float) -> float:
    return ce_sum_nats / (math.log(2) * max(num_bytes, 1.0))


def summed(eval_step: Callable, params: Any, batches: list[dict[str, np.ndarray]], sharding) -> Totals:
    """Summed nats, target tokens and target bytes over host-local batches."""
    totals = {"ce_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
    for batch in batches:
        sums = jax.device_get(eval_step(params, to_global(batch, sharding)))
        totals = {k: totals[k] + float(sums[k]) for k in totals}
    return totals


def metrics_of(totals: Totals) -> dict[str, float]:
    return {"loss": totals["ce_sum"] / max(totals["tokens"], 1.0),
            "bpb": bits_per_byte(totals["ce_sum"], totals["bytes"]),
            "bytes_per_token": totals["bytes"] / max(totals["tokens"], 1.0)}


def evaluate(eval_step: Callable, params: Any, batches: list[dict[str, np.ndarray]], mesh, rules) -> dict[str, float]:
    """Validation loss (nats per target token) and bits per byte over host-local batches."""
    return metrics_of(summed(eval_step, params, batches, mesh_lib.batch_sharding(mesh, rules)))


def evaluate_sets(eval_step: Callable, params: Any, sets: dict[str, list[dict[str, np.ndarray]]], mesh,
                  rules) -> dict[str, float]:
    """`evaluate` over every set together, plus `bpb/<name>` and `loss/<name>` per set when there
    are several (the sources of a data mixture)."""
    sharding = mesh_lib.batch_sharding(mesh, rules)
    per_set = {name: summed(eval_step, params, batches, sharding) for name, batches in sets.items()}
    out = metrics_of({k: sum(t[k] for t in per_set.values()) for k in ("ce_sum", "tokens", "bytes")})
    if len(per_set) > 1:
        for name, totals in per_set.items():
            m = metrics_of(totals)
            out.update({f"bpb/{name}": m["bpb"], f"loss/{name}": m["loss"]})
    return out
