"""The `train` section (the runner's loop: steps, evaluation, checkpoints) and its checks."""

from __future__ import annotations

import ml_collections

from gqlm.config.errors import check, check_choice, check_positive

NONFINITE = ("skip", "stop")


def defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        steps=1000,
        grad_accum=1,
        log_every=10,
        eval_every=200,
        eval_batches=8,
        checkpoint_every=200,
        keep_checkpoints=3,
        keep_every=0,  # also keep every N-th step's checkpoint forever; 0 disables
        verify_checkpoints=True,  # per-file CRC-32 manifest written after each save, checked at restore
        sample_tokens=200,  # text sampled at the end; 0 disables
        sample_prompt="\n",
        nonfinite="skip",  # NONFINITE: a non-finite step is skipped (counted) or stops the run
        compile_cache_dir="~/.cache/gqlm/jax_cache",  # "" disables
        progress=True,
        peak_flops_per_device=0.0,  # for MFU; 0 = look up the device kind (unknown on CPU)
        wandb_project="",  # also log metrics to this Weights & Biases project; "" disables (pip install -e .[wandb])
        profile_steps="",  # "START:STOP": jax.profiler trace of steps START..STOP-1 in <workdir>/tensorboard; "" = off
    ))


def validate(t: ml_collections.ConfigDict) -> None:
    check(t.steps > 0, f"train.steps={t.steps} must be positive")
    check(t.grad_accum >= 1, f"train.grad_accum={t.grad_accum} must be >= 1")
    check_choice("train.nonfinite", t.nonfinite, NONFINITE)
    check_positive(t, "train", ("log_every", "eval_every", "checkpoint_every", "eval_batches"))
    # orbax's max_to_keep=0 deletes every checkpoint, including the one just saved: nothing to resume.
    check_positive(t, "train", ("keep_checkpoints",))
    check_positive(t, "train", ("keep_every", "sample_tokens"), strict=False)  # 0: off
    profile_window(t)


def profile_window(t: ml_collections.ConfigDict) -> tuple[int, int] | None:
    """`train.profile_steps` as (start, stop), 0 <= start < stop <= train.steps; None when off."""
    if not t.profile_steps:
        return None
    start, _, stop = t.profile_steps.partition(":")
    ok = start.strip().isdecimal() and stop.strip().isdecimal() and int(start) < int(stop) <= t.steps
    check(ok, f"train.profile_steps={t.profile_steps!r} must be 'START:STOP' with 0 <= START < STOP <= "
              f"train.steps={t.steps}")
    return int(start), int(stop)
