"""GQ-VAE training pieces for the runner: state, the pure train/eval steps, dead-code re-seeding.

Shapes: B pretoken pieces per batch, T = max_pretoken_len, C codebook size, D embed dim,
N recent encoder outputs kept for re-seeding (N = C), R rows of them refreshed per step.

`python -m gqlm.train --config experiments/gqvae_shakespeare.py --workdir DIR` trains the model
(task.py plugs these pieces into the runner; train.py wraps that same runner).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gqlm.config import ConfigDict
from gqlm.tokenizers.gqvae.model import forward, make_model, split_params
from gqlm.tokenizers.gqvae.pretokenize import BYTE_PAD
from gqlm.tokenizers.gqvae.quantizer import reseed_codebook
from gqlm.train.tasks.gqvae.loss import loss_terms

Batch = dict[str, jax.Array]


class GQVAEState(NamedTuple):
    """The runner's train state for a GQ-VAE: TrainState's fields plus what re-seeding needs."""
    step: jax.Array  # int32 scalar: updates applied
    params: Any  # pure dict
    opt_state: Any
    rng: jax.Array  # uint32[2] raw key
    code_counts: jax.Array  # [C] float32: uses of each code since the last re-seeding
    recent: jax.Array  # [N, D] ring buffer of recent encoder outputs (re-seeding's source)
    recent_valid: jax.Array  # [N] bool: rows holding a real encoder output


def is_codebook(path: tuple[Any, ...]) -> bool:
    """Whether a parameter's key path ends in quantizer/codebook."""
    return jax.tree_util.keystr(path, simple=True, separator="/").split("/")[-2:] == ["quantizer", "codebook"]


def make_optimizer(cfg: ConfigDict, params: Any) -> optax.GradientTransformation:
    """Adam with the codebook in its own param group, `codebook_lr_multiplier` times faster."""
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "codebook" if is_codebook(path) else "default", params)
    lr = cfg.learning_rate
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.multi_transform({"default": optax.adam(lr),
                               "codebook": optax.adam(lr * cfg.codebook_lr_multiplier)}, labels))


def recent_rows_per_step(cfg: ConfigDict) -> int:
    """R: enough rows per step to refresh the whole buffer between two re-seedings."""
    return min(math.ceil(cfg.codebook_size / max(cfg.reseed_every, 1)), cfg.batch_size * cfg.max_pretoken_len)


def init_state(cfg: ConfigDict, tx: optax.GradientTransformation, key: jax.Array) -> GQVAEState:
    """Fresh state (call under jit with out_shardings, as the runner does)."""
    param_key, state_key = jax.random.split(key)
    _, params = split_params(make_model(cfg, param_key))
    c, d = cfg.codebook_size, cfg.embed_dim
    return GQVAEState(jnp.zeros((), jnp.int32), params, tx.init(params), state_key,
                      jnp.zeros((c,), jnp.float32), jnp.zeros((c, d), jnp.float32), jnp.zeros((c,), bool))


def with_lengths(batch: Batch) -> Batch:
    """The runner's batch is {'bytes': [B, T]} (BYTE_PAD after each piece); the lengths follow."""
    bytes_BT = batch["bytes"]
    return {"bytes": bytes_BT, "lengths": jnp.sum(bytes_BT != BYTE_PAD, axis=1).astype(jnp.int32)}


def remember(state: GQVAEState, z_BTD: jax.Array, valid_BT: jax.Array, key: jax.Array,
             rows: int) -> tuple[jax.Array, jax.Array]:
    """Writes `rows` random valid encoder outputs of this batch into the ring buffer (slots follow
    the step, so the buffer holds the last N / rows steps' outputs)."""
    z_ND = jax.lax.stop_gradient(z_BTD).reshape(-1, z_BTD.shape[-1])
    valid_N = valid_BT.reshape(-1)
    # Gumbel top-k: `rows` distinct positions, valid ones first (uniform among them).
    scores_N = jax.random.gumbel(key, valid_N.shape) + jnp.where(valid_N, 0.0, -1e9)
    picks_R = jax.lax.top_k(scores_N, rows)[1]
    slots_R = (state.step * rows + jnp.arange(rows)) % state.recent.shape[0]
    return (state.recent.at[slots_R].set(z_ND[picks_R]),
            state.recent_valid.at[slots_R].set(valid_N[picks_R]))


def reseed_dead_codes(state: GQVAEState, key: jax.Array) -> GQVAEState:
    """Post-update hook: codes unused since the last re-seeding take recent encoder outputs; the
    usage counts restart."""
    quantizer = state.params["quantizer"]
    codebook_CD = reseed_codebook(quantizer["codebook"], state.code_counts, state.recent, key, state.recent_valid)
    params = {**state.params, "quantizer": {**quantizer, "codebook": codebook_CD}}
    return state._replace(params=params, code_counts=jnp.zeros_like(state.code_counts))


def gate_weight_at(cfg: ConfigDict, step: jax.Array) -> Any:
    """The compression weight at `step`: `gate_loss_weight`, or with `gate_weight_ramp_steps` > 0,
    0 through warm-up (no quantization, so no bottleneck: whole pieces cost reconstruction nothing),
    then rising linearly to it over that many steps. A Python float without a ramp, so the
    paper's graph is unchanged."""
    if not cfg.gate_weight_ramp_steps:
        return cfg.gate_loss_weight
    ramp = (step - cfg.warmup_steps + 1) / cfg.gate_weight_ramp_steps
    return cfg.gate_loss_weight * jnp.clip(ramp, 0.0, 1.0)


def make_train_step(graphdef: nnx.GraphDef, cfg: ConfigDict, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, total_steps: int) -> Callable[[GQVAEState, Batch], Any]:
    """Pure `(state, batch) -> (state, metrics)`: quantization from step `warmup_steps`, a
    non-finite update skipped, dead codes re-seeded after every `reseed_every`-th update."""
    rows = recent_rows_per_step(cfg)

    def loss_fn(params, batch, quantize, gate_weight):
        out = forward(nnx.merge(graphdef, params), batch["bytes"], batch["lengths"], quantize,
                      cfg.fixed_gate_every, cfg.gate, cfg.gate_bound)
        loss, metrics = loss_terms(out, batch, quantize, cfg, gate_weight)
        return loss, (metrics, out["z"], out["valid"])

    def train_step(state: GQVAEState, batch: Batch) -> tuple[GQVAEState, dict[str, jax.Array]]:
        batch = with_lengths(batch)
        buffer_key, reseed_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
        (loss, (metrics, z_BTD, valid_BT)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, state.step >= cfg.warmup_steps, gate_weight_at(cfg, state.step))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        recent, recent_valid = remember(state, z_BTD, valid_BT, buffer_key, rows)
        counts_C = metrics.pop("code_counts")
        new = GQVAEState(state.step + 1, keep(optax.apply_updates(state.params, updates), state.params),
                         keep(opt_state, state.opt_state), jax.random.fold_in(state.rng, state.step),
                         keep(state.code_counts + counts_C, state.code_counts),
                         keep(recent, state.recent), keep(recent_valid, state.recent_valid))
        done = new.step
        due = ((cfg.reseed_every > 0) & (done > cfg.warmup_steps) & (done % max(cfg.reseed_every, 1) == 0)
               & (done < total_steps))
        codes_in_use = jnp.sum(new.code_counts > 0)  # since the last re-seeding, before this one
        new = jax.lax.cond(due, reseed_dead_codes, lambda s, k: s, new, reseed_key)
        return new, {**metrics, "codes_in_use": codes_in_use, "reseeded": due.astype(jnp.int32),
                     "gate_weight": jnp.asarray(gate_weight_at(cfg, state.step)), "grad_norm": grad_norm, "learning_rate": schedule(state.step),
                     "nonfinite": 1 - finite.astype(jnp.int32)}

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, cfg: ConfigDict) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """`(params, batch) -> metrics` with quantization on (as the tokenizer runs the model)."""
    def eval_step(params, batch):
        batch = with_lengths(batch)
        out = forward(nnx.merge(graphdef, params), batch["bytes"], batch["lengths"], True, cfg.fixed_gate_every,
                      cfg.gate, cfg.gate_bound)
        metrics = loss_terms(out, batch, True, cfg)[1]
        metrics["positions"] = jnp.sum(out["valid"].astype(jnp.float32))
        return metrics
    return eval_step
