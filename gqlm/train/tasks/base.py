"""What the runner trains. A task builds the experiment and owns everything model-specific the loop
touches: batches, initial state, the jitted train step, evaluation and its one-line summary.

The loop (train/loop.py) is the same for every task; the entry point picks the task
(`tasks.task_for(config)`): the language model (lm.py) or the GQ-VAE tokenizer model (gqvae/).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import Mesh

from gqlm.config import ConfigDict
from gqlm.train.experiment import Experiment
from gqlm.train.metrics import Throughput

Batch = dict[str, Any]


class Task:
    """The hooks the loop calls, in the order it calls them."""

    progress_keys: tuple[str, ...] = ("loss",)  # metrics shown in the progress bar

    def build(self, config: ConfigDict, mesh: Mesh) -> Experiment:
        """The Experiment (config validated, mesh made): model, optimizer, shardings, abstract state."""
        raise NotImplementedError

    def train_iterator(self, exp: Experiment) -> Any:
        """Host-local training batches; a grain iterator, whose state every checkpoint saves."""
        raise NotImplementedError

    def eval_batches(self, exp: Experiment) -> Any:
        """Host-local validation batches, in whatever grouping `evaluator` takes."""
        raise NotImplementedError

    def throughput(self, exp: Experiment) -> Throughput:
        raise NotImplementedError

    def init_state(self, exp: Experiment) -> Any:
        """A fresh state on `exp.shardings` (a NamedTuple with step, params, opt_state, rng)."""
        raise NotImplementedError

    def abstract_batch(self, exp: Experiment) -> Batch | None:
        """The global batch as sharded ShapeDtypeStructs (for the dry run's compiled memory), or
        None if the task cannot say without data."""
        return None

    def train_step(self, exp: Experiment) -> Callable[[Any, Batch], tuple[Any, dict[str, jax.Array]]]:
        """Jitted `(state, global batch) -> (state, metrics)`; metrics hold `loss` and `nonfinite`."""
        raise NotImplementedError

    def evaluator(self, exp: Experiment) -> Callable[[Any, Any], dict[str, float]]:
        """`(params, eval batches) -> validation metrics`."""
        raise NotImplementedError

    def watch(self, step: int, metrics: dict[str, float]) -> str | None:
        """Sees each logged step's train metrics; a returned line is shown as a warning."""
        return None

    def eval_summary(self, metrics: dict[str, float]) -> str:
        return f"validation loss {metrics['loss']:.4f}"

    def finish(self, exp: Experiment, state: Any) -> None:
        """Runs on process 0 once the last step is done (the LM prints a sample)."""

    def describe(self, exp: Experiment) -> tuple[list[str], str]:
        """(lines about the model, the optimizer's name) for --dry_run."""
        raise NotImplementedError
