"""What the runner trains. A task builds the experiment and owns everything model-specific the loop
touches: batches, initial state, the jitted train step, evaluation and its one-line summary.

The loop (loop.py) is the same for every task. `task_for(config)` picks it: the language model,
or with `gqvae.train_tokenizer=True` the GQ-VAE tokenizer model (gqlm/tokenizers/gqvae/task.py).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import Mesh

from gqlm.config import ConfigDict
from gqlm.data import pipeline
from gqlm.eval.bpb import evaluate
from gqlm.models.flops import count_params, flops_per_token
from gqlm.train import state as state_lib
from gqlm.train.experiment import build_lm, jit_eval_step, jit_train_step
from gqlm.train.metrics import Throughput, device_peak_flops
from gqlm.train.sampling import sample_text


class Task:
    """The hooks the loop calls, in the order it calls them."""

    progress_keys: tuple[str, ...] = ("loss",)  # metrics shown in the progress bar

    def build(self, config: ConfigDict, mesh: Mesh) -> Any:
        """The Experiment (config validated, mesh made): model, optimizer, shardings, abstract state."""
        raise NotImplementedError

    def train_iterator(self, exp: Any) -> Any:
        """Host-local training batches; a grain iterator, whose state every checkpoint saves."""
        raise NotImplementedError

    def eval_batches(self, exp: Any) -> list[dict[str, Any]]:
        raise NotImplementedError

    def throughput(self, exp: Any) -> Throughput:
        raise NotImplementedError

    def init_state(self, exp: Any) -> Any:
        """A fresh state on `exp.shardings` (a NamedTuple with step, params, opt_state, rng)."""
        raise NotImplementedError

    def train_step(self, exp: Any) -> Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]]:
        """Jitted `(state, global batch) -> (state, metrics)`; metrics hold `loss` and `nonfinite`."""
        raise NotImplementedError

    def evaluator(self, exp: Any) -> Callable[[Any, list[dict[str, Any]]], dict[str, float]]:
        """`(params, eval batches) -> validation metrics`."""
        raise NotImplementedError

    def eval_summary(self, metrics: dict[str, float]) -> str:
        return f"validation loss {metrics['loss']:.4f}"

    def finish(self, exp: Any, state: Any) -> None:
        """Runs on process 0 once the last step is done (the LM prints a sample)."""

    def describe(self, exp: Any) -> tuple[list[str], str]:
        """(lines about the model, the optimizer's name) for --dry_run."""
        raise NotImplementedError


class LMTask(Task):
    """The language model: gqlm's token pipeline, Transformer, loss and bits-per-byte evaluation."""

    progress_keys = ("loss", "bpb")

    def build(self, config: ConfigDict, mesh: Mesh) -> Any:
        return build_lm(config, mesh, self)

    def train_iterator(self, exp: Any) -> Any:
        return pipeline.make_train_iterator(exp.config, exp.tokenizer)

    def eval_batches(self, exp: Any) -> list[dict[str, Any]]:
        return pipeline.make_eval_batches(exp.config, exp.tokenizer, "validation", exp.config.train.eval_batches)

    def throughput(self, exp: Any) -> Throughput:
        cfg = exp.config
        return Throughput(cfg.data.batch_size * cfg.data.seq_len, flops_per_token(cfg.model, cfg.data.seq_len),
                          device_peak_flops(cfg.train.peak_flops_per_device))

    def init_state(self, exp: Any) -> Any:
        return state_lib.init_state(exp.config.model, exp.tx, exp.config.seed, exp.shardings)

    def train_step(self, exp: Any) -> Callable:
        return jit_train_step(exp)

    def evaluator(self, exp: Any) -> Callable:
        eval_step = jit_eval_step(exp)
        return lambda params, batches: evaluate(eval_step, params, batches, exp.mesh, exp.config.mesh.rules)

    def eval_summary(self, metrics: dict[str, float]) -> str:
        return f"validation loss {metrics['loss']:.4f}, bpb {metrics['bpb']:.4f}"

    def describe(self, exp: Any) -> tuple[list[str], str]:
        cfg = exp.config
        return ["parameters: " + ", ".join(f"{k} {v:,}" for k, v in count_params(cfg.model).items()),
                f"FLOPs per token (train, seq_len={cfg.data.seq_len}): "
                f"{flops_per_token(cfg.model, cfg.data.seq_len):.4g}"], cfg.optimizer.name

    def finish(self, exp: Any, state: Any) -> None:
        t = exp.config.train
        if t.sample_tokens:
            text = sample_text(exp, state.params, t.sample_prompt, t.sample_tokens)
            print(f"--- sample ({t.sample_tokens} tokens) ---\n{text}\n---")


def task_for(config: ConfigDict) -> Task:
    """The task a config trains."""
    if config.gqvae.train_tokenizer:
        from gqlm.tokenizers.gqvae.task import GQVAETask
        return GQVAETask()
    return LMTask()


# The loop's two data entry points (tests and benchmarks wrap these names in loop.py).
def make_train_iterator(exp: Any) -> Any:
    """The experiment's training batches, as its task makes them."""
    return exp.task.train_iterator(exp)


def make_eval_batches(exp: Any) -> list[dict[str, Any]]:
    """The experiment's validation batches (`train.eval_batches` of them), as its task makes them."""
    return exp.task.eval_batches(exp)
