"""gqlm parameters <-> HF Llama / Mixtral safetensors: one name table, looped over both ways.

D model dim, H heads, G kv heads, K head dim, F mlp dim, E experts, V vocab, L layers.

Each `Row` names a gqlm parameter (its pure-dict path), the HF tensor, and `groups`: for each HF
axis, the gqlm axes merged into it, outermost first. Export is `transpose(flatten(groups))` then
`reshape`; import reads the HF rows of a device's shard and undoes it. The leading `stack` axes
of a parameter (the layers of a scanned model, the experts of an MoE layer) enumerate separate
HF tensors (`{i}`, `{e}` in the name). MoE layers use Mixtral's hub layout
(`block_sparse_moe.experts.{e}.w1/w2/w3`), which transformers 5 also saves.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from typing import Any, Iterator, NamedTuple

import jax
import numpy as np

from gqlm.config import ConfigDict, ConfigError
from gqlm.interop import hf_config, hf_tokenizer
from gqlm.interop.safetensors_io import MODEL_FILE, Checkpoint, TensorSpec, write_safetensors
from gqlm.tokenizers.base import Tokenizer

Groups = tuple[tuple[int, ...], ...]


class Row(NamedTuple):
    gqlm: str  # pure-dict path, "/"-separated
    hf: str  # tensor name; {i} and {e} stand for the stack axes
    groups: Groups  # per HF axis, the gqlm axes (after the stack axes) merged into it
    stack: tuple[str, ...] = ()  # the name fields of the leading gqlm axes


# (gqlm path in a block, HF name in a layer, groups, stacked over experts)
LAYER_ROWS = (
    ("attn/q", "self_attn.q_proj.weight", ((1, 2), (0,)), False),  # [D,H,K] -> [H*K, D]
    ("attn/k", "self_attn.k_proj.weight", ((1, 2), (0,)), False),  # [D,G,K] -> [G*K, D]
    ("attn/v", "self_attn.v_proj.weight", ((1, 2), (0,)), False),
    ("attn/o", "self_attn.o_proj.weight", ((2,), (0, 1)), False),  # [H,K,D] -> [D, H*K]
    ("attn_norm/scale", "input_layernorm.weight", ((0,),), False),
    ("mlp_norm/scale", "post_attention_layernorm.weight", ((0,),), False),
)
DENSE_MLP_ROWS = (
    ("mlp/wi_gate", "mlp.gate_proj.weight", ((1,), (0,)), False),  # [D,F] -> [F,D]
    ("mlp/wi_up", "mlp.up_proj.weight", ((1,), (0,)), False),
    ("mlp/wo", "mlp.down_proj.weight", ((1,), (0,)), False),  # [F,D] -> [D,F]
)
MOE_MLP_ROWS = (
    ("mlp/router", "block_sparse_moe.gate.weight", ((1,), (0,)), False),  # [D,E] -> [E,D]
    ("mlp/wi_gate", "block_sparse_moe.experts.{e}.w1.weight", ((1,), (0,)), True),  # [E,D,F] -> E x [F,D]
    ("mlp/wi_up", "block_sparse_moe.experts.{e}.w3.weight", ((1,), (0,)), True),
    ("mlp/wo", "block_sparse_moe.experts.{e}.w2.weight", ((1,), (0,)), True),  # [E,F,D] -> E x [D,F]
)
TOP_ROWS = (
    Row("embed/table", "model.embed_tokens.weight", ((0,), (1,))),  # [V,D]
    Row("final_norm/scale", "model.norm.weight", ((0,),)),
)
UNEMBED_ROW = Row("unembed", "lm_head.weight", ((1,), (0,)))  # [D,V] -> [V,D]
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some checkpoints carry


def param_table(m: ConfigDict) -> list[Row]:
    """Every parameter of the model `m` (config.model) and its HF tensor(s)."""
    rows = list(TOP_ROWS) + ([] if m.tie_embeddings else [UNEMBED_ROW])
    layer_rows = LAYER_ROWS + (MOE_MLP_ROWS if m.moe.num_experts else DENSE_MLP_ROWS)
    for path, name, groups, experts in layer_rows:
        stack = ("e",) if experts else ()
        if m.scan_layers:
            rows.append(Row(f"blocks/{path}", f"model.layers.{{i}}.{name}", groups, ("i",) + stack))
        else:
            rows += [Row(f"blocks/{i}/{path}", f"model.layers.{i}.{name}", groups, stack)
                     for i in range(m.num_layers)]
    return rows


def hf_shape(shape: tuple[int, ...], groups: Groups) -> tuple[int, ...]:
    return tuple(math.prod(shape[a] for a in g) for g in groups)


def hf_tensors(row: Row, shape: tuple[int, ...]) -> Iterator[tuple[tuple[int, ...], str, tuple[int, ...]]]:
    """(stack index, HF name, HF shape) of each tensor of a gqlm parameter of `shape`."""
    n = len(row.stack)
    for idx in np.ndindex(*shape[:n]):
        yield idx, row.hf.format(**dict(zip(row.stack, idx))), hf_shape(shape[n:], row.groups)


def to_hf(x: np.ndarray, groups: Groups) -> np.ndarray:
    return x.transpose([a for g in groups for a in g]).reshape(hf_shape(x.shape, groups))


def read_shard(ckpt: Checkpoint, name: str, groups: Groups, shape: tuple[int, ...],
               index: tuple[slice, ...]) -> np.ndarray:
    """The `index` slice of the gqlm array of `shape` stored as HF tensor `name`, reading only the
    HF rows it needs (the outer axis of each group sliced, its inner axes whole)."""
    bounds = [index[a].indices(shape[a])[:2] for a in range(len(shape))]
    hf_index, block_shape = [], []
    for g in groups:
        inner = math.prod(shape[a] for a in g[1:])
        start, stop = bounds[g[0]]
        hf_index.append(slice(start * inner, stop * inner))
        block_shape += [stop - start] + [shape[a] for a in g[1:]]
    perm = [a for g in groups for a in g]
    block = ckpt.read(name, tuple(hf_index)).reshape(block_shape).transpose(np.argsort(perm))
    outer = {g[0] for g in groups}
    return block[tuple(slice(None) if a in outer else slice(*bounds[a]) for a in range(len(shape)))]


def read_param_shard(ckpt: Checkpoint, row: Row, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """`read_shard` over the stack axes too (one HF tensor per stack index)."""
    n = len(row.stack)
    if not n:
        return read_shard(ckpt, row.hf, row.groups, shape, index)
    ranges = [range(*index[a].indices(shape[a])[:2]) for a in range(n)]
    blocks = [read_shard(ckpt, row.hf.format(**dict(zip(row.stack, idx))), row.groups, shape[n:], index[n:])
              for idx in itertools.product(*ranges)]
    return np.stack(blocks).reshape(tuple(len(r) for r in ranges) + blocks[0].shape)


def flat_paths(tree: Any) -> dict[str, Any]:
    """Leaves of a pure-dict tree by "/"-joined path (the table's `gqlm` names)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in flat}


def _table_for(m: ConfigDict, params: Any) -> list[Row]:
    rows, paths = param_table(m), set(flat_paths(params))
    if {r.gqlm for r in rows} != paths:  # a model change the table does not know yet
        raise AssertionError(f"interop table out of date: {sorted(paths ^ {r.gqlm for r in rows})}")
    return rows


# ----------------------------------------------------------------------------- export


def export_params(params: Any, m: ConfigDict, path: str) -> None:
    """Writes `params` (pure dict of config.model `m`'s model) as HF safetensors to `path`,
    fetching one parameter from the devices at a time."""
    rows, flat = _table_for(m, params), flat_paths(params)
    specs = [TensorSpec(name, np.dtype(flat[r.gqlm].dtype), shape)
             for r in rows for _, name, shape in hf_tensors(r, tuple(flat[r.gqlm].shape))]

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for r in rows:
            x = np.asarray(jax.device_get(flat[r.gqlm]))
            for idx, name, _ in hf_tensors(r, x.shape):
                yield name, to_hf(x[idx], r.groups)

    write_safetensors(path, specs, tensors())


def check_exportable(config: ConfigDict) -> ConfigDict:
    """`config` itself if its model and tokenizer can be exported; else a ConfigError naming the key."""
    hf_config.check_exportable(config.model)
    hf_tokenizer.check_exportable(config.data.tokenizer)
    return config


EXPORT_FILES = (hf_config.CONFIG_FILE, hf_config.GENERATION_CONFIG_FILE, MODEL_FILE, hf_tokenizer.TOKENIZER_FILE,
                hf_tokenizer.TOKENIZER_CONFIG_FILE)


def check_out_dir(out_dir: str, flag: str = "out_dir") -> None:
    """ConfigError unless `out_dir` is new, empty, or holds only files an export writes: anything else
    there (another model's shards or index, tokenizer files) would be loaded beside the export."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"{flag}={out_dir!r} exists and is not a directory")
    foreign = sorted(set(os.listdir(out_dir)) - set(EXPORT_FILES)) if os.path.isdir(out_dir) else []
    if foreign:
        raise ConfigError(f"{flag}={out_dir!r} already holds {foreign[0]!r} ({len(foreign)} files an export does "
                          "not write); give a new or empty directory")


def export_model(params: Any, m: ConfigDict, tokenizer: Tokenizer, out_dir: str) -> None:
    """config.json + model.safetensors + tokenizer files that transformers loads without custom code,
    written beside `out_dir` and moved in only once all are complete (a failed export leaves none)."""
    hf_config.check_exportable(m)
    hf_tokenizer.check_exportable(tokenizer.kind)
    check_out_dir(out_dir)
    config = hf_config.to_hf_config(m, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    generation = hf_config.to_generation_config(m.vocab_size, tokenizer.vocab_size, tokenizer.bos_id,
                                                tokenizer.eos_id, tokenizer.pad_id)
    staging = f"{os.path.abspath(out_dir)}.tmp{os.getpid()}"
    os.makedirs(staging)
    try:
        for name, content in ((hf_config.CONFIG_FILE, config), (hf_config.GENERATION_CONFIG_FILE, generation)):
            with open(os.path.join(staging, name), "w") as f:
                json.dump(content, f, indent=2)
        export_params(params, m, os.path.join(staging, MODEL_FILE))
        hf_tokenizer.export_tokenizer(tokenizer, staging, m.max_seq_len)
        os.makedirs(out_dir, exist_ok=True)
        for name in EXPORT_FILES:
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------- import


def check_tensors(ckpt: Checkpoint, rows: list[Row], abstract: dict[str, Any]) -> None:
    """Every tensor the table expects is there with the shape config.json implies, and nothing else."""
    expected = {name: shape for r in rows for _, name, shape in hf_tensors(r, tuple(abstract[r.gqlm].shape))}
    where = f"init.from_hf: {ckpt.directory}"
    for name, shape in expected.items():
        if name not in ckpt.shapes:
            raise ConfigError(f"{where} has no tensor {name!r}")
        if ckpt.shapes[name] != shape:
            raise ConfigError(f"{where}: tensor {name} has shape {list(ckpt.shapes[name])}, "
                              f"config.json implies {list(shape)}")
    tied_head = () if UNEMBED_ROW.gqlm in abstract else (UNEMBED_ROW.hf,)
    extra = [n for n in ckpt.shapes if n not in expected and n not in tied_head and not n.endswith(IGNORED_SUFFIXES)]
    if extra:
        raise ConfigError(f"{where} has tensor {extra[0]!r} that gqlm's model has no place for "
                          f"({len(extra)} such tensors)")


def load_params(hf_dir: str, m: ConfigDict, abstract_params: Any, shardings: Any) -> Any:
    """The parameters of a HF checkpoint on `shardings`; each device reads only its shard."""
    rows, abstract = _table_for(m, abstract_params), flat_paths(abstract_params)
    flat_shardings = flat_paths(shardings)
    loaded = {}
    with Checkpoint(hf_dir) as ckpt:
        check_tensors(ckpt, rows, abstract)
        for r in rows:
            a = abstract[r.gqlm]

            def read(index, r=r, a=a):
                return read_param_shard(ckpt, r, tuple(a.shape), index).astype(a.dtype)
            loaded[r.gqlm] = jax.make_array_from_callback(tuple(a.shape), flat_shardings[r.gqlm], read)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: loaded[jax.tree_util.keystr(path, simple=True, separator="/")], abstract_params)
