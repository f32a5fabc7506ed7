"""Builders for each named optimizer: `BUILDERS[name](learning_rate, opt_cfg, decay_mask)`.

Each builder returns the full transform: optimizer -> decoupled weight decay (masked) ->
learning rate, in optax's convention update = -lr * (direction + wd * p). SOAP alone follows its
reference instead (decay of the already-updated parameter, skipped on its initialising call;
see `soap.soap`). Hyper-parameters come from `config.optimizer`: b1 is the momentum of every
member that has one (SGD and Signum included), b2 the second-moment decay of Adam-like members.
Adafactor uses optax's defaults (factored second moment with decay 1 - t^-0.8, update clipped
to block RMS 1, no momentum) and the learning rate as given (no parameter-scale multiplier).
"""

from __future__ import annotations

from typing import Any, Callable

import optax

from gqlm.config import ConfigDict
from gqlm.optim.adalayer import scale_by_adalayer
from gqlm.optim.soap import soap

Builder = Callable[[optax.ScalarOrSchedule, ConfigDict, Any], optax.GradientTransformation]


def _with_decay_and_lr(core: optax.GradientTransformation, lr: optax.ScalarOrSchedule,
                       o: ConfigDict, mask: Any) -> optax.GradientTransformation:
    parts = [core]
    if o.weight_decay > 0:
        parts.append(optax.add_decayed_weights(o.weight_decay, mask))
    parts.append(optax.scale_by_learning_rate(lr))
    return optax.chain(*parts)


def adamw(lr, o, mask):
    return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)


def lion(lr, o, mask):
    return optax.lion(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=mask)


def signum(lr, o, mask):
    core = optax.chain(optax.ema(o.b1, debias=False), optax.scale_by_sign())
    return _with_decay_and_lr(core, lr, o, mask)


def adafactor(lr, o, mask):
    core = optax.chain(optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0))
    return _with_decay_and_lr(core, lr, o, mask)


def sgd(lr, o, mask):
    return _with_decay_and_lr(optax.trace(decay=o.b1), lr, o, mask)


def adalayer(lr, o, mask):
    core = scale_by_adalayer(o.b1, o.b2, o.eps, head_pattern=o.adalayer_head_pattern)
    return _with_decay_and_lr(core, lr, o, mask)


def soap_builder(lr, o, mask):
    return soap(lr, b1=o.b1, b2=o.b2, shampoo_beta=o.shampoo_beta, eps=o.eps,
                weight_decay=o.weight_decay, precondition_frequency=o.precondition_frequency,
                max_precond_dim=o.max_precond_dim, merge_dims=o.merge_dims,
                precondition_1d=o.precondition_1d, normalize_grads=o.normalize_grads, mask=mask,
                max_precond_block=o.max_precond_block)


BUILDERS: dict[str, Builder] = {
    "adamw": adamw, "lion": lion, "signum": signum, "adafactor": adafactor, "sgd": sgd,
    "adalayer": adalayer, "soap": soap_builder,
}
