"""The language-model task: gqlm's token pipeline, Transformer, loss and bits-per-byte evaluation."""

from __future__ import annotations

from typing import Any, Callable

from jax.sharding import Mesh

from gqlm.config import ConfigDict
from gqlm.data import pipeline
from gqlm.interop import hf
from gqlm.models.flops import count_params, flops_per_token
from gqlm.train import state as state_lib
from gqlm.train.evaluation import evaluate_sets
from gqlm.train.experiment import Experiment, build_lm, jit_eval_step, jit_train_step
from gqlm.train.metrics import Throughput, device_peak_flops
from gqlm.train.sampling import sample_text
from gqlm.train.tasks.base import Batch, Task


class LMTask(Task):
    progress_keys = ("loss", "bpb")

    def __init__(self, with_tokenizer: bool = True):
        self.with_tokenizer = with_tokenizer  # False: a dry run (see build_lm)

    def build(self, config: ConfigDict, mesh: Mesh) -> Experiment:
        return build_lm(config, mesh, self.with_tokenizer)

    def train_iterator(self, exp: Experiment) -> Any:
        return pipeline.make_train_iterator(exp.config, exp.tokenizer)

    def eval_batches(self, exp: Experiment) -> dict[str, list[Batch]]:
        """Per source (one, unless the corpus is a mixture of prepared sources)."""
        return pipeline.make_eval_sets(exp.config, exp.tokenizer, "validation", exp.config.train.eval_batches)

    def throughput(self, exp: Experiment) -> Throughput:
        cfg = exp.config
        return Throughput(cfg.data.batch_size * cfg.data.seq_len, flops_per_token(cfg.model, cfg.data.seq_len),
                          device_peak_flops(cfg.train.peak_flops_per_device))

    def abstract_batch(self, exp: Experiment) -> Batch:
        return pipeline.abstract_batch(exp.config, exp.mesh)

    def init_state(self, exp: Experiment) -> state_lib.TrainState:
        """Random parameters, or those of `init.from_hf` (each device reading only its shard)."""
        cfg, params = exp.config, None
        if cfg.init.from_hf:
            params = hf.load_params(cfg.init.from_hf, cfg.model, exp.model.abstract_params, exp.model.param_shardings)
        return state_lib.init_state(cfg.model, exp.tx, cfg.seed, exp.shardings, params)

    def train_step(self, exp: Experiment) -> Callable:
        return jit_train_step(exp)

    def evaluator(self, exp: Experiment) -> Callable:
        eval_step = jit_eval_step(exp)
        return lambda params, sets: evaluate_sets(eval_step, params, sets, exp.mesh, exp.config.mesh.rules)

    def eval_summary(self, metrics: dict[str, float]) -> str:
        return f"validation loss {metrics['loss']:.4f}, bpb {metrics['bpb']:.4f}"

    def describe(self, exp: Experiment) -> tuple[list[str], str]:
        cfg = exp.config
        return ["parameters: " + ", ".join(f"{k} {v:,}" for k, v in count_params(cfg.model).items()),
                f"FLOPs per token (train, seq_len={cfg.data.seq_len}): "
                f"{flops_per_token(cfg.model, cfg.data.seq_len):.4g}"], cfg.optimizer.name

    def finish(self, exp: Experiment, state: Any) -> None:
        t = exp.config.train
        if t.sample_tokens:
            text = sample_text(exp, state.params, t.sample_prompt, t.sample_tokens)
            print(f"--- sample ({t.sample_tokens} tokens) ---\n{text}\n---")
