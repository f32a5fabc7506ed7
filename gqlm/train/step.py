"""The pure train and eval steps. B batch, T length, V vocab.

`train_step(state, batch) -> (state, metrics)` is built by `make_train_step` from the static
pieces (graphdef, optimizer, loss weights) so that the jitted function itself is short and pure.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gqlm.config import ConfigDict
from gqlm.train.state import TrainState

Batch = dict[str, jax.Array]


def token_losses(graphdef: nnx.GraphDef, params: Any, batch: Batch, token_bytes_V: jax.Array, *,
                 rules: Any = None, jitter_key: jax.Array | None = None
                 ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Summed cross-entropy (nats), target tokens and target bytes of one batch, plus model aux.

    `rules` (config.mesh.rules) and `jitter_key` (training only) reach the MoE layers."""
    model = nnx.merge(graphdef, params)
    logits_BTV, aux = model(batch["inputs"], batch["positions"], batch["segment_ids"],
                            jitter_key=jitter_key, rules=rules)
    ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
    mask_BT = batch["loss_mask"]
    sums = {
        "ce_sum": jnp.sum(ce_BT * mask_BT),
        "tokens": jnp.sum(mask_BT),
        "bytes": jnp.sum(token_bytes_V[batch["targets"]] * mask_BT),
    }
    return sums, aux


def aux_loss(aux: dict[str, jax.Array], moe_cfg: ConfigDict) -> jax.Array:
    """Weighted MoE auxiliary losses (zero for a dense model)."""
    return (moe_cfg.lb_loss_weight * aux.get("lb_loss", 0.0)
            + moe_cfg.z_loss_weight * aux.get("z_loss", 0.0))


def flatten_vectors(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Scalars only: a vector metric like the MoE `load` [E] becomes `load/e0`, `load/e1`, ..."""
    out = {}
    for key, value in metrics.items():
        if jnp.ndim(value) == 1:
            out.update({f"{key}/e{i}": value[i] for i in range(value.shape[0])})
        else:
            out[key] = value
    return out


def split_microbatches(batch: Batch, num: int) -> Batch:
    """[B, T] -> [num, B/num, T] (row i goes to microbatch i % num, keeping data shards local)."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1), batch)


def accumulate_gradients(grad_fn: Callable, batch: Batch, num_micro: int) -> Any:
    """Sums `grad_fn(microbatch, index)` (values and grads) over `num_micro` microbatches with a scan."""
    micros = split_microbatches(batch, num_micro), jnp.arange(num_micro)
    shapes = jax.eval_shape(grad_fn, *jax.tree.map(lambda x: x[0], micros))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    step = lambda carry, micro: (jax.tree.map(jnp.add, carry, grad_fn(*micro)), None)
    return jax.lax.scan(step, zeros, micros)[0]


def count_first(batch: Batch, total_tokens: jax.Array) -> Batch:
    """The batch, its inputs read through the global token count (>= 1, so unchanged): the count's
    all-reduce then runs before the forward pass instead of wherever a device reaches it.

    XLA:CPU blocks a pool thread in a collective until every device arrives, so a collective left
    free to float can hold threads idle while other devices are deep in their forward pass (with
    the cond guard below: 0.97x -> 1.00x a minimal step, docs/throughput.md). Dividing the gradients
    by the count after the backward pass would drop the collective, but rounds every gradient
    differently."""
    return dict(batch, inputs=jnp.where(total_tokens > 0, batch["inputs"], 0))


def apply_update(tx: optax.GradientTransformation, grads: Any, params: Any, opt_state: Any) -> tuple[Any, Any]:
    """(new params, new optimizer state) of one optimizer step."""
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def apply_update_if(finite: jax.Array, tx: optax.GradientTransformation, grads: Any, params: Any,
                    opt_state: Any) -> tuple[Any, Any]:
    """`apply_update` when `finite`, else (params, opt_state) unchanged. A cond, not a where over
    every leaf after the update: no second pass over the whole parameter and optimizer state."""
    unchanged = lambda grads, params, opt_state: (params, opt_state)  # noqa: E731
    return jax.lax.cond(finite, functools.partial(apply_update, tx), unchanged, grads, params, opt_state)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    config: ConfigDict, token_bytes_V: jax.Array) -> Callable:
    grad_accum, moe_cfg, rules = config.train.grad_accum, config.model.moe, config.mesh.rules
    jitter = moe_cfg.num_experts > 0 and moe_cfg.router_jitter > 0

    def micro_loss(params, micro, total_tokens, jitter_key):
        sums, aux = token_losses(graphdef, params, micro, token_bytes_V, rules=rules, jitter_key=jitter_key)
        loss = sums["ce_sum"] / total_tokens + aux_loss(aux, moe_cfg) / grad_accum
        return loss, (sums, aux)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        batch = count_first(batch, total_tokens)
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        # Router jitter noise, fresh each step (state.rng is folded with the step below) and each microbatch.
        jitter_key = jax.random.split(state.rng)[1] if jitter else None
        micro_key = lambda i: jax.random.fold_in(jitter_key, i) if jitter else None  # noqa: E731
        (loss, (sums, aux)), grads = accumulate_gradients(
            lambda micro, i: grad_fn(state.params, micro, total_tokens, micro_key(i)), batch, grad_accum)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step is not applied: the state (and so a `stop` checkpoint) stays the last good one.
        params, opt_state = apply_update_if(finite, tx, grads, state.params, state.opt_state)
        new_state = TrainState(state.step + 1, params, opt_state, jax.random.fold_in(state.rng, state.step))
        aux = jax.tree.map(lambda v: v / grad_accum, aux)
        metrics = {"loss": loss, "ce": sums["ce_sum"] / total_tokens,
                   "bpb": sums["ce_sum"] / (math.log(2) * jnp.maximum(sums["bytes"], 1.0)),
                   "grad_norm": grad_norm, "learning_rate": schedule(state.step),
                   "tokens": sums["tokens"], "nonfinite": 1 - finite.astype(jnp.int32), **flatten_vectors(aux)}
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, token_bytes_V: jax.Array, rules: Any = None) -> Callable:
    def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
        return token_losses(graphdef, params, batch, token_bytes_V, rules=rules)[0]
    return eval_step
