"""GQ-VAE training: a pure jitted step, dead-code re-seeding, and a small driver that saves an
orbax checkpoint plus the model config.

Shapes: B pretoken pieces per batch, T = max_pretoken_len, C codebook size, D embed dim, N = B*T.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from gqlm.config import ConfigDict, ConfigError, base_config, validate_gqvae
from gqlm.tokenizers.gqvae.loss import gqvae_loss
from gqlm.tokenizers.gqvae.model import GQVAE, valid_mask
from gqlm.tokenizers.gqvae.pretokenize import corpus_pieces
from gqlm.tokenizers.gqvae.quantizer import reseed_codebook

CHECKPOINT_KIND = "gqvae_checkpoint"
CHECKPOINT_VERSION = 1
MANIFEST = "gqvae.json"
PARAMS_DIR = "params"


class CheckpointError(ConfigError):
    """A path that is not a readable GQ-VAE checkpoint; the message names the path."""


def make_model(cfg: ConfigDict, seed: int = 0) -> GQVAE:
    return GQVAE(cfg, nnx.Rngs(params=seed))


def is_codebook(path: tuple[Any, ...]) -> bool:
    return tuple(str(p) for p in path[-2:]) == ("quantizer", "codebook")


def make_optimizer(cfg: ConfigDict, params: Any) -> optax.GradientTransformation:
    """Adam with the codebook on its own, `codebook_lr_multiplier` times faster, param group."""
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "codebook" if is_codebook(tuple(getattr(k, "key", k) for k in path)) else "default",
        params)
    lr = cfg.learning_rate
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.multi_transform({"default": optax.adam(lr),
                               "codebook": optax.adam(lr * cfg.codebook_lr_multiplier)}, labels))


def make_train_step(graphdef: nnx.GraphDef, cfg: ConfigDict,
                    tx: optax.GradientTransformation) -> Callable[..., Any]:
    """jitted (params, opt_state, batch, step, rng) -> (params, opt_state, metrics).

    `rng` is unused by this deterministic model; it is in the signature for parity with gqlm's
    other steps. Quantization is on from step `warmup_steps`."""

    def train_step(params, opt_state, batch, step, rng):
        del rng

        def loss_fn(p):
            return gqvae_loss(nnx.merge(graphdef, p), batch, step >= cfg.warmup_steps, cfg)

        grads, metrics = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    return jax.jit(train_step, donate_argnums=(0, 1))


def make_reseed(graphdef: nnx.GraphDef) -> Callable[..., Any]:
    """jitted (params, counts [C], batch, rng) -> params with dead codes re-seeded from the
    batch's encoder outputs (the recent ones)."""

    def reseed(params, counts_C, batch, rng):
        model = nnx.merge(graphdef, params)
        valid_BT = valid_mask(batch["lengths"], batch["bytes"].shape[1])
        z_BTD = model.encoder(batch["bytes"], valid_BT)
        recent_ND = z_BTD.reshape(-1, z_BTD.shape[-1])
        model.quantizer.codebook[...] = reseed_codebook(
            model.quantizer.codebook[...], counts_C, recent_ND, rng, valid_BT.reshape(-1))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    return jax.jit(reseed, donate_argnums=(0,))


class PieceSampler:
    """Random batches of pretoken pieces (repeats kept, so frequent pieces are seen often)."""

    def __init__(self, texts: Sequence[str], cfg: ConfigDict, seed: int = 0, limit: int = 2_000_000):
        self.bytes, self.lengths = corpus_pieces(texts, cfg.max_pretoken_len, limit)
        if not len(self.lengths):
            raise ValueError("GQ-VAE training texts contain no characters")
        self.rng = np.random.default_rng(seed)
        self.batch_size = cfg.batch_size

    def __call__(self, n: int = 0) -> dict[str, np.ndarray]:
        idx = self.rng.integers(0, len(self.lengths), n or self.batch_size)
        return {"bytes": self.bytes[idx], "lengths": self.lengths[idx]}


def train_gqvae(config: ConfigDict, texts: Sequence[str], workdir: str, steps: int,
                log: Callable[[int, dict[str, float]], None] | None = None,
                log_every: int = 50) -> tuple[nnx.GraphDef, Any, list[dict[str, float]]]:
    """Trains on `texts` for `steps` steps; saves `workdir` as a checkpoint. Returns
    (graphdef, params, logged metrics). `config` is a full gqlm config (its `gqvae` section and
    `seed` are read) or a bare `gqvae` section."""
    cfg = config.gqvae if "gqvae" in config else config
    seed = int(config.get("seed", 0))
    validate_gqvae(cfg)
    graphdef, params = split_params(make_model(cfg, seed))
    tx = make_optimizer(cfg, params)
    opt_state = tx.init(params)
    step_fn, reseed_fn = make_train_step(graphdef, cfg, tx), make_reseed(graphdef)
    sample = PieceSampler(texts, cfg, seed)
    rng = jax.random.key(seed)
    counts_C = jnp.zeros((cfg.codebook_size,), jnp.float32)
    history: list[dict[str, float]] = []
    for step in range(steps):
        batch = sample()
        rng, step_rng, reseed_rng = jax.random.split(rng, 3)
        params, opt_state, metrics = step_fn(params, opt_state, batch, jnp.int32(step), step_rng)
        counts_C = counts_C + metrics.pop("code_counts")
        done = step + 1
        if cfg.reseed_every and done > cfg.warmup_steps and done % cfg.reseed_every == 0 and done < steps:
            # Fresh pieces, enough to give each dead code its own vector (one batch may hold
            # fewer distinct encoder outputs than there are dead codes).
            params = reseed_fn(params, counts_C, sample(max(cfg.batch_size, cfg.codebook_size // 2)), reseed_rng)
            counts_C = jnp.zeros_like(counts_C)
        if done % log_every == 0 or done == steps:
            row = {k: float(v) for k, v in jax.device_get(metrics).items()}
            row["step"] = done
            history.append(row)
            if log:
                log(done, row)
    save_checkpoint(workdir, cfg, params, steps)
    return graphdef, params, history


def split_params(model: GQVAE) -> tuple[nnx.GraphDef, Any]:
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def save_checkpoint(workdir: str, cfg: ConfigDict, params: Any, steps: int) -> None:
    """`workdir/params` (orbax) + `workdir/gqvae.json` (kind, version, the gqvae config)."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(workdir, PARAMS_DIR), params, force=True)
    manifest = {"kind": CHECKPOINT_KIND, "format_version": CHECKPOINT_VERSION, "steps": steps,
                "gqvae": cfg.to_dict()}
    with open(os.path.join(workdir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)


def load_checkpoint(path: str) -> tuple[ConfigDict, nnx.GraphDef, Any]:
    """(gqvae config, graphdef, params) from a `train_gqvae` workdir; one-line errors naming it."""
    path = os.path.abspath(path)
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"GQ-VAE checkpoint {path!r} does not exist")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        # An LM workdir (gqlm.train) holds checkpoints/ and no manifest: say so, it is the likely mix-up.
        hint = ("; it looks like an LM workdir (gqlm.train), train one with gqlm.tokenizers.gqvae.train"
                if os.path.isdir(os.path.join(path, "checkpoints")) else "")
        raise CheckpointError(f"{path!r} is not a GQ-VAE checkpoint (no readable {MANIFEST}){hint}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path!r} is not a GQ-VAE checkpoint (kind is not {CHECKPOINT_KIND!r})")
    if manifest.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"GQ-VAE checkpoint {path!r} has format_version "
                              f"{manifest.get('format_version')!r}; this gqlm reads {CHECKPOINT_VERSION}")
    cfg = config_from_dict(manifest.get("gqvae", {}), path)
    graphdef, abstract = split_params(nnx.eval_shape(lambda: make_model(cfg)))
    try:
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore(os.path.join(path, PARAMS_DIR), abstract)
    except Exception as e:  # orbax raises many types; any of them means an unusable checkpoint.
        raise CheckpointError(f"GQ-VAE checkpoint {path!r} has unreadable params: {type(e).__name__}") from None
    return cfg, graphdef, params


def config_from_dict(values: dict[str, Any], where: str) -> ConfigDict:
    """A validated `gqvae` section: schema defaults overridden by `values` (unknown keys refused)."""
    cfg = base_config().gqvae
    for key, value in values.items():
        if key not in cfg:
            raise CheckpointError(f"{where!r}: unknown gqvae config key {key!r}")
        cfg[key] = type(cfg[key])(value)
    try:
        validate_gqvae(cfg)
    except ConfigError as e:
        raise CheckpointError(f"{where!r}: {e}") from None
    return ml_collections.ConfigDict(cfg.to_dict())


def main(argv: Sequence[str]) -> None:
    """`python -m gqlm.tokenizers.gqvae.train --config EXP.py[:arg] --workdir DIR [--vocab_size N]`:
    trains on the experiment's corpus (train split) for `train.steps` steps; with --vocab_size, also
    builds the tokenizer into DIR/tokenizer and prints its validation bytes/token."""
    from absl import flags

    from gqlm import cli
    from gqlm.data.corpora import load_documents
    from gqlm.tokenizers.gqvae.tokenizer import build_gqvae_tokenizer

    del argv
    fl = flags.FLAGS
    config = cli.config_from_flags(fl.config)
    validate_gqvae(config.gqvae)
    texts = load_documents(config.data, "train")[:]

    def log(step: int, row: dict[str, float]) -> None:
        keys = ("loss", "recon", "byte_accuracy", "mean_gate", "mean_token_len", "codebook_usage",
                "codebook_perplexity")
        print(f"step {step}: " + " ".join(f"{k}={row[k]:.3f}" for k in keys), flush=True)

    train_gqvae(config, texts, fl.workdir, config.train.steps, log, config.train.log_every)
    print(f"checkpoint: {fl.workdir}")
    if fl.vocab_size:
        out = os.path.join(fl.workdir, "tokenizer")
        tok = build_gqvae_tokenizer(fl.workdir, fl.vocab_size, texts, out)
        valid = load_documents(config.data, "validation")[:]
        n_bytes = sum(int(tok.token_bytes()[ids].sum()) for ids in tok.encode_batch(valid))
        n_tokens = sum(len(ids) for ids in tok.encode_batch(valid))
        print(f"tokenizer: {out} (use data.tokenizer=gqvae:{out}); vocab_size={tok.vocab_size}, "
              f"validation bytes/token {n_bytes / max(n_tokens, 1):.3f}")


if __name__ == "__main__":
    from absl import flags as _flags

    from gqlm import cli as _cli

    _flags.DEFINE_string("config", "", "experiment file[:variant], e.g. experiments/gqvae_shakespeare.py")
    _flags.DEFINE_string("workdir", None, "output directory (checkpoint + gqvae.json)", required=True)
    _flags.DEFINE_integer("vocab_size", 0, "also build a tokenizer of this size (0: skip)")
    _cli.run(main)
