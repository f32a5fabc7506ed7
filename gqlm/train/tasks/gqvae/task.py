"""The GQ-VAE tokenizer model as a runner task (tasks/base.py): `python -m gqlm.train` trains
it with the same loop, orbax checkpoints (+ resume), batch sharding, progress bar and metric files
as an LM. Selected by `gqvae.train_tokenizer=True`.

Batches are {'bytes': [B, T] int32}: B pretoken pieces of the corpus (repeats kept, so frequent
pieces are seen often), shuffled by a grain pipeline whose state each checkpoint saves. B is
`gqvae.batch_size`, T `gqvae.max_pretoken_len`; B is sharded like an LM batch's rows.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import grain
import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from gqlm import mesh as mesh_lib
from gqlm.config import ConfigDict, ConfigError
from gqlm.config.data import PREPARED
from gqlm.data.corpora import load_documents
from gqlm.data.pipeline import open_split, process_slice, to_global
from gqlm.data.prepared import document_texts
from gqlm.tokenizers import load_tokenizer
from gqlm.optim.factory import opt_state_shardings
from gqlm.tokenizers.gqvae.model import make_model
from gqlm.tokenizers.gqvae.pretokenize import BYTE_PAD, corpus_pieces
from gqlm.train import state as state_lib
from gqlm.train.experiment import Experiment
from gqlm.train.metrics import Throughput
from gqlm.train.tasks.base import Task
from gqlm.train.tasks.gqvae import step as gq
from gqlm.train.tasks.gqvae.collapse import CollapseMonitor

MAX_PIECES = 4_000_000  # pieces kept per split (the Shakespeare train split has ~2.3M)


class PieceRows:
    """grain map: a global batch of piece indices -> this process's rows {'bytes': [b, T]}."""

    def __init__(self, bytes_NT: np.ndarray, lo: int, hi: int):
        self.bytes_NT, self.lo, self.hi = bytes_NT, lo, hi

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {"bytes": self.bytes_NT[np.asarray(indices)[self.lo:self.hi]].astype(np.int32)}


def batch_shards(mesh: Mesh, rules: Any) -> int:
    """How many ways the batch axis is split."""
    axes = mesh_lib.batch_sharding(mesh, rules).spec[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


class GQVAETask(Task):
    """`texts` ({'train': [...], 'validation': [...]}) replaces the corpus of `config.data`."""

    progress_keys = ("loss", "byte_accuracy", "mean_token_len")

    def __init__(self, texts: dict[str, Sequence[str]] | None = None):
        self.texts = texts
        self._pieces: dict[str, np.ndarray] = {}
        self.monitor = CollapseMonitor()

    def watch(self, step: int, metrics: dict[str, float]) -> str | None:
        return self.monitor.update(step, metrics)

    def pieces(self, exp: Experiment, split: str) -> np.ndarray:
        """[N, T] bytes of the split's pieces, in text order (int16: half the memory of int32), the
        first MAX_PIECES of them: a prepared corpus is read only that far, its sources by weight."""
        if split not in self._pieces:
            bytes_NT, _ = corpus_pieces(self.split_texts(exp.config, split), exp.config.gqvae.max_pretoken_len,
                                        MAX_PIECES)
            if not len(bytes_NT):
                where = "the given texts" if self.texts else f"data.corpus={exp.config.data.corpus!r}"
                raise ConfigError(f"GQ-VAE {split} texts ({where}) contain no characters")
            self._pieces[split] = bytes_NT.astype(np.int16)
        return self._pieces[split]

    def split_texts(self, config: ConfigDict, split: str) -> Iterable[str]:
        """The texts of `split`: the given ones, the documents of `data.sources` (decoded with
        `data.tokenizer`, which must be the one that prepared them), or those of `data.corpus`."""
        if self.texts:
            return self.texts[split]
        if config.data.corpus == PREPARED:
            tokenizer = load_tokenizer(config.data.tokenizer)
            return document_texts(*open_split(config, tokenizer, split), tokenizer)
        return iter(load_documents(config.data, split))

    def build(self, config: ConfigDict, mesh: Mesh) -> Experiment:
        q, rules = config.gqvae, config.mesh.rules
        if config.train.grad_accum != 1:
            raise ConfigError(f"train.grad_accum={config.train.grad_accum}: the GQ-VAE task takes 1")
        shards = batch_shards(mesh, rules)
        if q.batch_size % shards:
            raise ConfigError(f"gqvae.batch_size={q.batch_size} is not divisible by the data-parallel size {shards}")
        model = state_lib.model_layout(nnx.eval_shape(lambda: make_model(q)), rules, mesh, nnx.Param)
        abstract_params, param_shardings = model.abstract_params, model.param_shardings
        tx = gq.make_optimizer(q, abstract_params)
        replicated = mesh_lib.replicated(mesh)
        shardings = gq.GQVAEState(replicated, param_shardings,
                                  opt_state_shardings(tx, abstract_params, param_shardings, mesh),
                                  replicated, replicated, replicated, replicated)
        shapes = jax.eval_shape(lambda: gq.init_state(q, tx, jax.random.PRNGKey(0)))
        config = config.copy_and_resolve_references()
        config.lock()
        return Experiment(config, mesh, None, model, tx, optax.constant_schedule(q.learning_rate),
                          shardings, state_lib.with_shardings(shapes, shardings))

    def train_iterator(self, exp: Experiment) -> grain.DatasetIterator:
        cfg = exp.config
        bytes_NT = self.pieces(exp, "train")
        lo, hi = process_slice(cfg.gqvae.batch_size, key="gqvae.batch_size")
        ds = grain.MapDataset.range(len(bytes_NT)).shuffle(seed=cfg.seed).repeat(cfg.data.num_epochs)
        ds = ds.batch(cfg.gqvae.batch_size, drop_remainder=True).map(PieceRows(bytes_NT, lo, hi))
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))

    def eval_batches(self, exp: Experiment) -> list[dict[str, np.ndarray]]:
        """The split's first `train.eval_batches` batches, in order; rows past its end are empty."""
        b = exp.config.gqvae.batch_size
        bytes_NT = self.pieces(exp, "validation")
        padded = np.concatenate([bytes_NT, np.full((1, bytes_NT.shape[1]), BYTE_PAD, bytes_NT.dtype)])
        lo, hi = process_slice(b, key="gqvae.batch_size")
        count = min(exp.config.train.eval_batches, -(-len(bytes_NT) // b))
        rows = [np.minimum(i * b + np.arange(lo, hi), len(bytes_NT)) for i in range(count)]
        return [{"bytes": padded[r].astype(np.int32)} for r in rows]

    def throughput(self, exp: Experiment) -> Throughput:
        q = exp.config.gqvae  # "tokens" are byte positions; no FLOPs model, so no MFU
        return Throughput(q.batch_size * q.max_pretoken_len, 0.0, None)

    def init_state(self, exp: Experiment) -> gq.GQVAEState:
        q = exp.config.gqvae
        init = jax.jit(lambda key: gq.init_state(q, exp.tx, key), out_shardings=exp.shardings)
        return init(jax.random.PRNGKey(exp.config.seed))

    def train_step(self, exp: Experiment) -> Callable:
        batch = mesh_lib.batch_sharding(exp.mesh, exp.config.mesh.rules)
        step = gq.make_train_step(exp.model.graphdef, exp.config.gqvae, exp.tx, exp.schedule, exp.config.train.steps)
        return jax.jit(step, in_shardings=(exp.shardings, batch), out_shardings=(exp.shardings, None),
                       donate_argnums=0)

    def evaluator(self, exp: Experiment) -> Callable:
        sharding = mesh_lib.batch_sharding(exp.mesh, exp.config.mesh.rules)
        step = jax.jit(gq.make_eval_step(exp.model.graphdef, exp.config.gqvae),
                       in_shardings=(exp.shardings.params, sharding))

        def evaluate(params: Any, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
            """Position-weighted means over the batches; codebook usage over all of them."""
            sums: dict[str, float] = {}
            counts_C, positions = 0.0, 0.0
            for batch in batches:
                m = jax.device_get(step(params, to_global(batch, sharding)))
                counts_C = counts_C + m.pop("code_counts")
                n = float(m.pop("positions"))
                positions += n
                for k, v in m.items():
                    if k not in ("codebook_usage", "codebook_perplexity"):
                        sums[k] = sums.get(k, 0.0) + float(v) * n
            out = {k: v / max(positions, 1.0) for k, v in sums.items()}
            out.update(codebook_stats(np.asarray(counts_C)))
            return out

        return evaluate

    def describe(self, exp: Experiment) -> tuple[list[str], str]:
        q = exp.config.gqvae
        count = sum(math.prod(x.shape) for x in jax.tree.leaves(exp.model.abstract_params))
        return [f"parameters: gqvae {count:,} (codebook {q.codebook_size} x {q.embed_dim})",
                f"batch: {q.batch_size} pieces x {q.max_pretoken_len} bytes"], \
            f"adam, codebook lr x{q.codebook_lr_multiplier:g}"

    def eval_summary(self, m: dict[str, float]) -> str:
        return (f"validation loss {m['loss']:.4f}, byte accuracy {m['byte_accuracy']:.3f}, mean token "
                f"{m['mean_token_len']:.2f} bytes ({m['pretoken_cut_share']:.2f} of 3-10-byte pieces cut "
                f"inside), {int(m['codes_in_use'])} codes in use (perplexity {m['codebook_perplexity']:.0f})")


def codebook_stats(counts_C: np.ndarray) -> dict[str, float]:
    """Codes in use, their fraction and the perplexity of the code distribution."""
    p_C = counts_C / max(counts_C.sum(), 1.0)
    entropy = -float(np.sum(p_C[p_C > 0] * np.log(p_C[p_C > 0])))
    return {"codes_in_use": float(np.sum(counts_C > 0)), "codebook_usage": float(np.mean(counts_C > 0)),
            "codebook_perplexity": math.exp(entropy)}
