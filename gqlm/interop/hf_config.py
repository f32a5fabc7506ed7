"""gqlm's `model` config <-> a Llama / Mixtral `config.json`, and what neither side can express.

One table (`CONFIG_KEYS`: gqlm key -> config.json key) serves both directions. A dense gqlm model
is a `LlamaForCausalLM`, a model whose every layer is a dropless top-k MoE without a shared expert
a `MixtralForCausalLM`; anything else is refused with one line naming the config key, never
approximated. Checked against transformers 5.24's modeling code: RMSNorm with eps inside the
rsqrt and the scale applied after normalising; RoPE in the half-split (`rotate_half`) layout with
theta^(-2i/K); attention scaled by K^-0.5; SwiGLU silu(gate) * up; Mixtral's router
softmax(logits) -> top-k -> renormalised to sum 1 (gqlm's `moe_router.route`, jitter aside).
"""

from __future__ import annotations

import json
import os
from typing import Any

from gqlm.config import ConfigDict, ConfigError, base_config, moe_layer_indices
from gqlm.config import model as model_section

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}

# gqlm `model.` key -> config.json key (values resolved: no 0 = "same as" defaults on either side).
CONFIG_KEYS = (
    ("vocab_size", "vocab_size"),
    ("embed_dim", "hidden_size"),
    ("num_layers", "num_hidden_layers"),
    ("num_heads", "num_attention_heads"),
    ("num_kv_heads", "num_key_value_heads"),
    ("head_dim", "head_dim"),
    ("mlp_dim", "intermediate_size"),
    ("max_seq_len", "max_position_embeddings"),
    ("rope_theta", "rope_theta"),
    ("norm_eps", "rms_norm_eps"),
    ("tie_embeddings", "tie_word_embeddings"),
)
MOE_KEYS = (("moe.num_experts", "num_local_experts"), ("moe.top_k", "num_experts_per_tok"))
OPTIONAL_KEYS = ("num_key_value_heads", "head_dim", "tie_word_embeddings")  # with their HF defaults
ADVISORY_KEYS = ("max_seq_len",)  # no parameter depends on it: an explicit gqlm value wins on import
# config.json keys that must hold these values (or be absent): what gqlm's math is.
REQUIRED_VALUES = (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                   ("sliding_window", None), ("pretraining_tp", 1))


def check_exportable(m: ConfigDict) -> None:
    """Raises ConfigError, naming the key, for a model that Llama / Mixtral cannot express."""
    if m.position != "rope":
        raise ConfigError(f"model.position={m.position!r} cannot be exported: Llama/Mixtral use RoPE only")
    if not m.moe.num_experts:
        return
    e = m.moe
    if e.shared_expert:
        raise ConfigError("model.moe.shared_expert=True cannot be exported: Mixtral has no shared expert")
    if moe_layer_indices(m) != tuple(range(m.num_layers)):
        raise ConfigError(f"model.moe.every={e.every} / model.moe.layers={tuple(e.layers)} cannot be "
                          f"exported: Mixtral needs every one of the {m.num_layers} layers to be MoE")
    if e.dispatch != "dropless":
        raise ConfigError(f"model.moe.dispatch={e.dispatch!r} cannot be exported: it drops tokens over "
                          "capacity, Mixtral never does")


def _resolved(m: ConfigDict) -> dict[str, Any]:
    """gqlm model values by `model.` key, with the 0 defaults resolved."""
    values = {key: m[key] for key, _ in CONFIG_KEYS}
    values["num_kv_heads"] = m.num_kv_heads or m.num_heads
    values["head_dim"] = m.head_dim or m.embed_dim // m.num_heads
    if m.moe.num_experts:
        values["mlp_dim"] = m.moe.mlp_dim or m.mlp_dim
        values.update({"moe.num_experts": m.moe.num_experts, "moe.top_k": m.moe.top_k})
    return values


def to_generation_config(model_vocab: int, tokenizer_vocab: int, bos_id: int, eos_id: int,
                         pad_id: int) -> dict[str, Any]:
    """generation_config.json: `transformers` generation never emits the ids of the embedding's
    padding past the tokenizer's vocabulary (`suppress_tokens`), as gqlm's own does not."""
    return {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
            "suppress_tokens": list(range(tokenizer_vocab, model_vocab))}


def to_hf_config(m: ConfigDict, bos_id: int, eos_id: int, pad_id: int) -> dict[str, Any]:
    """The config.json of an exportable model (`check_exportable`)."""
    check_exportable(m)
    model_type = "mixtral" if m.moe.num_experts else "llama"
    values = _resolved(m)
    out = {hf: values[key] for key, hf in CONFIG_KEYS + (MOE_KEYS if m.moe.num_experts else ())}
    out["rope_theta"] = float(out["rope_theta"])
    out["rms_norm_eps"] = float(out["rms_norm_eps"])
    out["tie_word_embeddings"] = bool(out["tie_word_embeddings"])
    out.update({key: value for key, value in REQUIRED_VALUES if model_type == "llama" or key != "mlp_bias"})
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": out["rope_theta"]}
    out.update(architectures=[ARCHITECTURES[model_type]], model_type=model_type,
               bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
               dtype=m.param_dtype, attention_dropout=0.0, use_cache=True)
    if model_type == "mixtral":
        out.update(router_jitter_noise=0.0, output_router_logits=False)
    return dict(sorted(out.items()))


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    """config.json of a Llama / Mixtral checkpoint; one-line ConfigError for anything else."""
    file = os.path.join(os.path.expanduser(hf_dir), CONFIG_FILE)
    try:
        with open(file) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"init.from_hf: cannot read {file} ({type(e).__name__})")
    if not isinstance(hf, dict) or hf.get("model_type") not in ARCHITECTURES:
        got = hf.get("model_type") if isinstance(hf, dict) else type(hf).__name__
        raise ConfigError(f"init.from_hf: {file} model_type={got!r}; gqlm reads 'llama' or 'mixtral'")
    for key, value in REQUIRED_VALUES:
        if hf.get(key, value) != value:
            raise ConfigError(f"init.from_hf: {file} {key}={hf[key]!r} is not supported (gqlm needs {value!r})")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"init.from_hf: {file} rope_type={rope.get('rope_type', rope.get('type'))!r} "
                          "is not supported (gqlm has plain RoPE)")
    return hf


def model_values(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """gqlm `model.` key -> value of a config.json (`read_hf_config`), through `CONFIG_KEYS`."""
    keys = CONFIG_KEYS + (MOE_KEYS if hf["model_type"] == "mixtral" else ())
    rope = hf.get("rope_parameters") or {}
    found = {"rope_theta": rope.get("rope_theta", hf.get("rope_theta")), **hf}
    missing = [hf_key for _, hf_key in keys if found.get(hf_key) is None and hf_key not in OPTIONAL_KEYS]
    if missing:
        raise ConfigError(f"init.from_hf: {where} lacks {missing[0]!r}")
    values = {key: found.get(hf_key) for key, hf_key in keys}
    values["num_kv_heads"] = values["num_kv_heads"] or values["num_heads"]
    values["tie_embeddings"] = bool(values["tie_embeddings"])
    if not values["head_dim"]:
        if values["embed_dim"] % values["num_heads"]:
            raise ConfigError(f"init.from_hf: {where} num_attention_heads={values['num_heads']} does not "
                              f"divide hidden_size={values['embed_dim']} and there is no head_dim")
        values["head_dim"] = values["embed_dim"] // values["num_heads"]
    values.update(position="rope", rope_theta=float(values["rope_theta"]), norm_eps=float(values["norm_eps"]))
    values["moe.num_experts"] = values.get("moe.num_experts", 0)
    if values["moe.num_experts"]:
        values.update({"moe.mlp_dim": values["mlp_dim"], "moe.every": 1, "moe.layers": (),
                       "moe.shared_expert": False})
    return values


def apply_hf_model(config: ConfigDict) -> ConfigDict:
    """A copy of `config` whose model shape is the config.json of `init.from_hf`.

    A key set away from its default to another value than the checkpoint's is a ConfigError
    naming it; so is a config.json whose values gqlm's model checks reject.
    """
    where = os.path.join(config.init.from_hf, CONFIG_FILE)
    values = model_values(read_hf_config(config.init.from_hf), where)
    defaults, config = base_config().model, config.copy_and_resolve_references()
    for key, value in values.items():
        current, default = _get(config.model, key), _get(defaults, key)
        if key in ADVISORY_KEYS and current != default:
            continue
        if current != default and current != value:
            raise ConfigError(f"model.{key}={current!r} conflicts with init.from_hf: {where} gives {value!r}")
        try:
            _set(config.model, key, value)
        except TypeError:
            raise ConfigError(f"init.from_hf: {where} gives model.{key} the value {value!r} of the wrong type")
    try:
        model_section.validate(config.model, expert_axis=1)
    except ConfigError as e:
        raise ConfigError(f"init.from_hf: {where} describes a model gqlm rejects: {e}")
    config.lock()
    return config


def _get(section: ConfigDict, key: str) -> Any:
    for part in key.split(".")[:-1]:
        section = section[part]
    value = section[key.split(".")[-1]]
    return tuple(value) if isinstance(value, list) else value


def _set(section: ConfigDict, key: str, value: Any) -> None:
    for part in key.split(".")[:-1]:
        section = section[part]
    section[key.split(".")[-1]] = value
