"""The `init` section: where an LM run's initial parameters come from, and its checks.

`init.from_hf=DIR` starts from a local Llama/Mixtral-style checkpoint (`config.json` +
`*.safetensors`, as `gqlm.export` writes and `transformers` saves): the model shape is read from
its config.json (gqlm/interop/hf_config.py) and the weights replace the random init. Optimizer
state, step and data position start fresh.
"""

from __future__ import annotations

import os

import ml_collections

from gqlm.config.errors import check


def defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        from_hf="",  # a local HF checkpoint directory; "" = random init
    ))


def validate(i: ml_collections.ConfigDict) -> None:
    if i.from_hf:
        path = os.path.expanduser(i.from_hf)
        check(os.path.isdir(path), f"init.from_hf={i.from_hf!r} is not a directory")
        check(os.path.isfile(os.path.join(path, "config.json")),
              f"init.from_hf={i.from_hf!r} has no config.json")
