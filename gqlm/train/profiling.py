"""A jax.profiler trace over a window of training steps (train.profile_steps="START:STOP"; off by default).

Steps are counted like `state.step` before they run: "10:15" traces the updates that take the step
counter from 10 to 15 (logged as steps 11..15). The trace is written under
`<workdir>/tensorboard/plugins/profile/<timestamp>/`, where tensorboard's profile plugin finds it
(`tensorboard --logdir <workdir>/tensorboard`). A run resumed inside the window traces its remainder.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import jax

from gqlm.config import ConfigDict
from gqlm.config.train import profile_window


class ProfileWindow:
    """`with window.step(step): <fetch + dispatch>`, then `window.step_done(step, state)`."""

    def __init__(self, train_cfg: ConfigDict, log_dir: str):
        self.window, self.log_dir, self.tracing = profile_window(train_cfg), log_dir, False

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Starts the trace at the window's first step; names each traced step for the profile plugin."""
        if self.window and not self.tracing and self.window[0] <= step < self.window[1]:
            jax.profiler.start_trace(self.log_dir)
            self.tracing = True
        named = jax.profiler.StepTraceAnnotation("train", step_num=step) if self.tracing else contextlib.nullcontext()
        with named:
            yield

    def step_done(self, step: int, state: Any) -> None:
        """After `step` is dispatched: at the window's last step, waits for its result and ends the trace,
        so the trace holds whole steps."""
        if self.tracing and step + 1 == self.window[1]:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        """Ends a trace still running (a run stopped inside the window)."""
        if self.tracing:
            self.tracing = False
            jax.profiler.stop_trace()

    def __enter__(self) -> "ProfileWindow":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
