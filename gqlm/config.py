"""The one config schema: defaults, validation, and override parsing.

An experiment file defines `get_config(arg: str | None = None) -> ConfigDict`, starting from
`base_config()` and changing only what it needs. The returned dict is locked, so an override of
a key that does not exist is an error rather than a silent no-op.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
from typing import Any

import ml_collections

ConfigDict = ml_collections.ConfigDict

MESH_AXES = ("data", "fsdp", "tensor", "expert")
SYNTHETIC_TASKS = ("copy", "recall", "parity", "addition", "phonebook")  # gqlm/data/synthetic.py
PHONEBOOK_NAMES = 26**4  # phonebook names are 4 lowercase letters (gqlm/data/synthetic.py)

# Logical axis -> mesh axes. Changing parallelism is an edit of this table (or the mesh sizes).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("layers", None),
    ("norm", None),
)


class ConfigError(ValueError):
    """A user mistake in a config or override; the message names the offending key."""


def base_config() -> ConfigDict:
    """Every key gqlm reads, with its default. Experiments override a subset."""
    c = ConfigDict()
    c.seed = 0

    c.model = m = ConfigDict()
    m.vocab_size = 0  # 0: taken from the tokenizer (rounded up to a multiple of 128).
    m.embed_dim = 256
    m.num_layers = 4
    m.num_heads = 4
    m.num_kv_heads = 0  # 0: same as num_heads (multi-head); fewer: grouped-query attention.
    m.head_dim = 0  # 0: embed_dim // num_heads.
    m.mlp_dim = 1024
    m.max_seq_len = 1024
    m.position = "rope"  # rope | alibi | none
    m.rope_theta = 10_000.0
    # einsum: plain XLA ops (fastest on CPU); cudnn: jax.nn.dot_product_attention's fused
    # flash-attention kernel (GPU, bf16/fp16); xla: that function's reference path;
    # auto: cudnn on GPUs when compute_dtype is bfloat16, else einsum.
    m.attention_impl = "auto"
    m.tie_embeddings = True
    m.norm_eps = 1e-6
    m.remat = False
    m.scan_layers = False
    m.param_dtype = "float32"
    m.compute_dtype = "float32"
    m.init_std = 0.02
    m.moe = e = ConfigDict()
    e.num_experts = 0  # 0: dense model.
    e.top_k = 2
    e.every = 1  # every N-th layer is MoE (layer i where (i + 1) % every == 0).
    e.layers = ()  # explicit MoE layer indices; overrides `every` when non-empty.
    e.mlp_dim = 0  # 0: model.mlp_dim.
    e.shared_expert = False
    e.dispatch = "dropless"  # dropless | capacity
    e.capacity_factor = 1.25
    e.backend = "auto"  # auto | ragged | dense
    e.router_jitter = 0.0
    e.lb_loss_weight = 0.01
    e.z_loss_weight = 0.001

    c.data = d = ConfigDict()
    d.corpus = "shakespeare"  # shakespeare | python_stdlib | text_files | synthetic:TASK (SYNTHETIC_TASKS)
    d.glob = ""  # files for corpus=text_files
    d.data_dir = ""  # tfds data dir; "" = ~/.cache/gqlm/tfds
    d.tokenizer = "byte"  # byte | bpe:DIR | gqvae:DIR
    d.seq_len = 256
    d.batch_size = 32  # global, across all processes
    d.worker_count = 0  # grain worker processes; 0 = in-process
    d.num_epochs = 1000  # the training stream repeats (reshuffled) this many times
    # Synthetic tasks (data.corpus="synthetic:TASK", gqlm/data/synthetic.py): train/validation
    # examples have lengths drawn uniformly from [min_len, max_len]; evaluation picks its own.
    d.synthetic_min_len = 1
    d.synthetic_max_len = 8
    d.synthetic_seed = 0  # the example stream and parity's secret positions
    d.synthetic_parity_k = 3  # k of k-sparse parity (secret positions < synthetic_min_len)
    d.synthetic_phonebook_size = 2000  # entries of phonebook's fixed book (4-letter names, seed-fixed)

    c.optimizer = o = ConfigDict()
    o.name = "adamw"  # adamw | lion | signum | adafactor | sgd | adalayer | soap
    o.learning_rate = 3e-3
    o.schedule = "cosine"  # cosine | linear | constant
    o.warmup_steps = 100
    o.min_lr_ratio = 0.1
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.1
    o.grad_clip = 1.0  # global-norm clip; 0 disables
    o.precondition_frequency = 10
    o.max_precond_dim = 10_000
    o.shampoo_beta = -1.0
    o.merge_dims = False
    o.precondition_1d = False
    o.normalize_grads = False
    o.adalayer_head_pattern = r"(^|/)unembed/"  # adalayer: output-head params (one v per output row)
    # Parameter groups: tuple of dicts {name, pattern (regex on the '/'-joined param path),
    # optimizer (name), lr_multiplier}; parameters matching no group use the main optimizer.
    o.groups = ()

    c.train = t = ConfigDict()
    t.steps = 1000
    t.grad_accum = 1
    t.log_every = 10
    t.eval_every = 200
    t.eval_batches = 8
    t.checkpoint_every = 200
    t.keep_checkpoints = 3
    t.keep_every = 0  # also keep every N-th step's checkpoint forever; 0 disables
    t.verify_checkpoints = True  # per-file CRC-32 manifest written after each save, checked at restore
    t.sample_tokens = 200  # text sampled at the end; 0 disables
    t.sample_prompt = "\n"
    t.nonfinite = "skip"  # skip | stop
    t.compile_cache_dir = "~/.cache/gqlm/jax_cache"  # "" disables
    t.progress = True
    t.peak_flops_per_device = 0.0  # for MFU; 0 = look up the device kind (unknown on CPU)

    c.mesh = ConfigDict()
    c.mesh.data = -1  # -1: all remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.expert = 1
    c.mesh.rules = DEFAULT_RULES

    # GQ-VAE tokenizer model (gqlm/tokenizers/gqvae); trained separately from the LM.
    c.gqvae = q = ConfigDict()
    q.train_tokenizer = False  # True: `python -m gqlm.train` trains this GQ-VAE, not an LM (gqlm/train/task.py)
    q.embed_dim = 128
    q.num_heads = 4
    q.encoder_layers = 2
    q.gater_layers = 2
    q.mlp_dim = 512
    q.codebook_size = 1024
    q.max_token_len = 10  # K: the longest token, in bytes
    q.max_pretoken_len = 16  # pretokens are cut into pieces of at most this many bytes
    q.warmup_steps = 500  # steps without quantization
    q.reseed_every = 250  # dead codes re-seeded from recent encoder outputs; 0 disables
    q.codebook_lr_multiplier = 10.0
    q.gate_loss_weight = 3.0
    q.commit_weight = 1.0
    q.codebook_weight = 0.25
    q.fixed_gate_every = 0  # h > 0: VQ-VAE baseline with a token end every h bytes; 0 = learned
    q.learning_rate = 1e-3
    q.batch_size = 256  # pretokens per step
    return c


def config_from_dict(saved: dict) -> ConfigDict:
    """Rebuilds a config saved as JSON (lists back to tuples, defaults for keys added since)."""
    config = base_config()

    def fill(node: ConfigDict, values: dict) -> None:
        for key, value in values.items():
            if key not in node:
                continue  # a key this version no longer reads
            if isinstance(node[key], ConfigDict):
                fill(node[key], value)
            else:
                node[key] = _to_tuples(value) if isinstance(value, list) else value

    fill(config, saved)
    config.lock()
    return config


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


# ----------------------------------------------------------------------------- experiment files


def load_python_file(path: str, what: str) -> Any:
    """Imports a user's Python file (experiment, sweep) by path; ConfigError naming it if that fails."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location("gqlm_user_file", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # A broken user file is a user error: report it in one line.
        raise ConfigError(f"{what} {path!r} failed to load: {type(e).__name__}: {e}")
    return module


def load_experiment(spec: str) -> ConfigDict:
    """Loads `path/to/exp.py[:arg]` and returns its locked config."""
    path, _, arg = spec.partition(":")
    module = load_python_file(path, "experiment file")
    if not hasattr(module, "get_config"):
        raise ConfigError(f"experiment file {path!r} defines no get_config()")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except (ConfigError, ValueError, KeyError) as e:
        raise ConfigError(f"experiment file {path!r}: get_config({arg!r}) failed: {e}")
    config.lock()
    return config


def parse_value(text: str) -> Any:
    """Python literal if it parses as one ('4', '1e-3', '(1, 2)', 'True'), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config: ConfigDict, key: str, text: str) -> None:
    """Sets `config.<key>` from command-line text, raising ConfigError naming the key."""
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
        if not isinstance(node, ConfigDict) or part not in node:
            raise ConfigError(f"unknown config key {'.'.join(parents[: i + 1])!r} (in override {key!r})")
        node = node[part]
    if not isinstance(node, ConfigDict) or leaf not in node:
        raise ConfigError(f"unknown config key {key!r}")
    old = node[leaf]
    value = parse_value(text)
    if isinstance(old, str):
        value = text
    elif isinstance(old, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"config key {key!r} expects a bool, got {text!r}")
        value = text.lower() in ("true", "1")
    elif isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    if old is not None and not isinstance(value, type(old)) and not isinstance(old, ConfigDict):
        raise ConfigError(
            f"config key {key!r} expects {type(old).__name__}, got {text!r} ({type(value).__name__})")
    if isinstance(old, ConfigDict):
        raise ConfigError(f"config key {key!r} is a section, not a value")
    with node.unlocked():
        node[leaf] = value


def apply_overrides(config: ConfigDict, overrides: dict[str, str]) -> ConfigDict:
    for key, text in overrides.items():
        apply_override(config, key, text)
    return config


# ----------------------------------------------------------------------------- validation


def resolve_mesh_shape(mesh: ConfigDict, num_devices: int) -> dict[str, int]:
    """Sizes of (data, fsdp, tensor, expert); one -1 takes the remaining devices."""
    sizes = {a: int(mesh[a]) for a in MESH_AXES}
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis}={size} must be a positive size or -1")
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ConfigError(f"only one mesh axis may be -1, got {', '.join('mesh.' + a for a in fill)}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh sizes {sizes} leave no whole size for mesh.{fill[0]}: {num_devices} devices")
        sizes[fill[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(
            f"mesh sizes data*fsdp*tensor*expert = {math.prod(sizes.values())} "
            f"but there are {num_devices} devices")
    return sizes


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: ConfigDict, num_devices: int) -> None:
    """Checks everything that can be checked before a compile; raises ConfigError."""
    m, d, o, t = config.model, config.data, config.optimizer, config.train
    sizes = resolve_mesh_shape(config.mesh, num_devices)
    for key in ("embed_dim", "num_layers", "num_heads", "mlp_dim", "max_seq_len"):
        _check(m[key] > 0, f"model.{key}={m[key]} must be positive")
    _check(m.embed_dim % m.num_heads == 0 or m.head_dim > 0,
           f"model.num_heads={m.num_heads} does not divide model.embed_dim={m.embed_dim}")
    kv = m.num_kv_heads or m.num_heads
    _check(m.num_heads % kv == 0,
           f"model.num_kv_heads={m.num_kv_heads} does not divide model.num_heads={m.num_heads}")
    _check(m.position in ("rope", "alibi", "none"),
           f"model.position={m.position!r} must be one of rope, alibi, none")
    _check(m.attention_impl in ("auto", "einsum", "cudnn", "xla"),
           f"model.attention_impl={m.attention_impl!r} must be one of auto, einsum, cudnn, xla")
    for key in ("param_dtype", "compute_dtype"):
        _check(m[key] in ("float32", "bfloat16"), f"model.{key}={m[key]!r} must be float32 or bfloat16")
    _check(d.seq_len > 0, f"data.seq_len={d.seq_len} must be positive")
    _check(d.seq_len <= m.max_seq_len,
           f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    batch_shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    _check(t.grad_accum >= 1, f"train.grad_accum={t.grad_accum} must be >= 1")  # before it divides below
    _check(d.batch_size > 0, f"data.batch_size={d.batch_size} must be positive")
    _check(d.batch_size % (batch_shards * t.grad_accum) == 0,
           f"data.batch_size={d.batch_size} is not divisible by the data-parallel size "
           f"{batch_shards} x train.grad_accum={t.grad_accum}")
    corpora = ("shakespeare", "python_stdlib", "text_files") + tuple(f"synthetic:{k}" for k in SYNTHETIC_TASKS)
    _check(d.corpus in corpora, f"data.corpus={d.corpus!r} must be one of {', '.join(corpora)}")
    if d.corpus.startswith("synthetic:"):
        _check(1 <= d.synthetic_min_len <= d.synthetic_max_len,
               f"data.synthetic_min_len={d.synthetic_min_len} and data.synthetic_max_len="
               f"{d.synthetic_max_len} must satisfy 1 <= min_len <= max_len")
        _check(d.corpus != "synthetic:parity" or 1 <= d.synthetic_parity_k <= d.synthetic_min_len,
               f"data.synthetic_parity_k={d.synthetic_parity_k} must lie in [1, data.synthetic_min_len="
               f"{d.synthetic_min_len}]")
        _check(d.corpus != "synthetic:phonebook" or 1 <= d.synthetic_phonebook_size <= PHONEBOOK_NAMES,
               f"data.synthetic_phonebook_size={d.synthetic_phonebook_size} must lie in [1, {PHONEBOOK_NAMES}] "
               f"(the distinct 4-letter names)")
    _check(d.corpus != "text_files" or bool(d.glob), "data.glob must be set when data.corpus='text_files'")
    _check(o.learning_rate > 0, f"optimizer.learning_rate={o.learning_rate} must be positive")
    for key in ("b1", "b2"):
        _check(0 <= o[key] < 1, f"optimizer.{key}={o[key]} must lie in [0, 1)")
    _check(o.precondition_frequency >= 1,
           f"optimizer.precondition_frequency={o.precondition_frequency} must be >= 1")
    _check(o.warmup_steps >= 0, f"optimizer.warmup_steps={o.warmup_steps} must be >= 0")
    _check(t.steps > 0, f"train.steps={t.steps} must be positive")
    _check(t.nonfinite in ("skip", "stop"), f"train.nonfinite={t.nonfinite!r} must be skip or stop")
    for key in ("log_every", "eval_every", "checkpoint_every"):
        _check(t[key] > 0, f"train.{key}={t[key]} must be positive")
    e = m.moe
    if e.num_experts:
        _check(e.num_experts > 0, f"model.moe.num_experts={e.num_experts} must be >= 0")
        _check(1 <= e.top_k <= e.num_experts,
               f"model.moe.top_k={e.top_k} must lie in [1, model.moe.num_experts={e.num_experts}]")
        _check(e.num_experts % sizes["expert"] == 0,
               f"model.moe.num_experts={e.num_experts} is not divisible by mesh.expert={sizes['expert']}")
        _check(e.dispatch in ("dropless", "capacity"),
               f"model.moe.dispatch={e.dispatch!r} must be dropless or capacity")
        _check(e.capacity_factor > 0, f"model.moe.capacity_factor={e.capacity_factor} must be > 0")
        _check(e.backend in ("auto", "ragged", "dense"),
               f"model.moe.backend={e.backend!r} must be auto, ragged or dense")
        _check(e.every >= 1, f"model.moe.every={e.every} must be >= 1")
        for i in e.layers:
            _check(0 <= i < m.num_layers,
                   f"model.moe.layers contains {i}, outside the model's {m.num_layers} layers")

    validate_gqvae(config.gqvae)


def validate_gqvae(q: ConfigDict) -> None:
    """Checks the `gqvae` section (the GQ-VAE tokenizer model)."""
    for key in ("embed_dim", "num_heads", "encoder_layers", "gater_layers", "mlp_dim", "codebook_size",
                "max_token_len", "max_pretoken_len", "batch_size"):
        _check(q[key] > 0, f"gqvae.{key}={q[key]} must be positive")
    _check(q.embed_dim % q.num_heads == 0,
           f"gqvae.num_heads={q.num_heads} does not divide gqvae.embed_dim={q.embed_dim}")
    for key in ("warmup_steps", "reseed_every", "fixed_gate_every", "gate_loss_weight", "commit_weight",
                "codebook_weight"):
        _check(q[key] >= 0, f"gqvae.{key}={q[key]} must be >= 0")
    _check(q.codebook_lr_multiplier > 0,
           f"gqvae.codebook_lr_multiplier={q.codebook_lr_multiplier} must be positive")
    _check(q.learning_rate > 0, f"gqvae.learning_rate={q.learning_rate} must be positive")
    _check(q.fixed_gate_every <= q.max_token_len,
           f"gqvae.fixed_gate_every={q.fixed_gate_every} exceeds gqvae.max_token_len={q.max_token_len}")


def moe_layer_indices(model: ConfigDict) -> tuple[int, ...]:
    """Indices of the layers whose MLP is a mixture of experts."""
    e = model.moe
    if not e.num_experts:
        return ()
    if e.layers:
        return tuple(sorted(e.layers))
    return tuple(i for i in range(model.num_layers) if (i + 1) % e.every == 0)
