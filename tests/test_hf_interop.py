"""HF interop (gqlm/interop, gqlm/export.py): logits agree with transformers both ways (fp32, CPU,
max abs error <= 1e-4), export -> import -> export is byte-identical, and what cannot be expressed
or read is refused with one line naming the config key, file or tensor."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gqlm import config as config_lib
from gqlm.config import ConfigError, base_config
from gqlm.interop import hf, hf_config
from gqlm.interop.safetensors_io import MODEL_FILE, Checkpoint
from gqlm.mesh import make_mesh
from gqlm.models.transformer import Transformer
from gqlm.tokenizers.bpe import train_bpe
from gqlm.tokenizers.byte import ByteTokenizer
from gqlm.train import state as state_lib
from gqlm.train.checkpoint import restore_trained
from gqlm.train.experiment import build_experiment
from gqlm.train.loop import train
from gqlm.train.tasks.lm import LMTask

ROOT = os.path.join(os.path.dirname(__file__), "..")
TOLERANCE = 1e-4
# Every parameter axis sharded somewhere, `kv` (inside the merged HF q/k/v rows) included.
SHARDED_RULES = (("batch", ("data", "fsdp", "expert")), ("length", None), ("embed", "fsdp"),
                 ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("kv", "data"),
                 ("vocab", "tensor"), ("expert", "expert"), ("expert_mlp", "tensor"), ("layers", None),
                 ("norm", "fsdp"))


def smoke_config():
    return config_lib.load_experiment(os.path.join(ROOT, "experiments", "tiny_cpu.py") + ":smoke")


def tiny_model(moe=False, **overrides):
    m = base_config().model
    m.update(dict(vocab_size=384, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                  max_seq_len=64, rope_theta=500.0, norm_eps=1e-5, init_std=0.2))
    if moe:
        m.moe.update(dict(num_experts=4, top_k=2, mlp_dim=24))
    return config_lib.apply_overrides(m, overrides)


def random_params(m, seed=0):
    """A model's params with non-trivial norm scales (init is all ones)."""
    params = nnx.to_pure_dict(nnx.state(Transformer(m, rngs=nnx.Rngs(seed))))
    key = jax.random.PRNGKey(seed + 1)

    def perturb(path, x):
        if "scale" not in jax.tree_util.keystr(path):
            return x
        noise = jax.random.normal(jax.random.fold_in(key, x.size + len(str(path))), x.shape)
        return (x + 0.3 * noise).astype(x.dtype)
    return jax.tree_util.tree_map_with_path(perturb, params)


def gqlm_logits(m, params, ids):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(m, rngs=nnx.Rngs(0))))

    @jax.jit
    def forward(params, ids_BT):
        positions_BT = jnp.broadcast_to(jnp.arange(ids_BT.shape[1]), ids_BT.shape)
        return nnx.merge(graphdef, params)(ids_BT, positions_BT, jnp.ones_like(ids_BT))[0]
    return np.asarray(forward(params, jnp.asarray(ids, jnp.int32)))


def hf_logits(hf_dir, ids):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                              attn_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def random_ids(vocab, seed=0, shape=(2, 24)):
    return np.random.default_rng(seed).integers(0, vocab, shape)


def export(m, params, out, tokenizer=None):
    hf.export_model(params, m, tokenizer or ByteTokenizer(), str(out))
    return str(out)


# ----------------------------------------------------------------------------- gqlm -> transformers


EXPORT_CASES = {  # name: (MoE, model overrides)
    "dense_tied": (False, {}),
    "dense_untied_headdim12_1kv": (False, {"tie_embeddings": False, "head_dim": 12, "num_kv_heads": 1}),
    "dense_scanned": (False, {"scan_layers": True}),
    "moe_tied": (True, {}),
    "moe_untied": (True, {"tie_embeddings": False}),
}


@pytest.mark.parity
@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_matches_transformers(tmp_path, case):
    moe, overrides = EXPORT_CASES[case]
    m = tiny_model(moe=moe, **overrides)
    params = random_params(m)
    out = export(m, params, tmp_path)
    architecture = "MixtralForCausalLM" if moe else "LlamaForCausalLM"
    assert json.load(open(os.path.join(out, "config.json")))["architectures"] == [architecture]
    ids = random_ids(m.vocab_size)
    ours = gqlm_logits(m, params, ids)
    error = np.max(np.abs(ours - hf_logits(out, ids)))
    print(f"export {case}: max abs logit error {error:.2e} (logits std {ours.std():.2f})")
    assert error <= TOLERANCE


@pytest.mark.parity
def test_exported_generation_never_emits_padding_ids_and_matches_gqlm(tmp_path):
    """The embedding is padded past the tokenizer (384 vs 259 ids): transformers' greedy generation
    on the export reads generation_config.json's suppress_tokens, and so gives gqlm's tokens."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from gqlm.models import decode
    m, tok = tiny_model(init_std=0.5), ByteTokenizer()
    params = random_params(m)
    out = export(m, params, tmp_path)
    prompts, n = [[tok.bos_id, 72, 101, 108], [tok.bos_id, 40, 32, 97]], 12
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(m, rngs=nnx.Rngs(0))))
    ours = np.asarray(decode.generate(graphdef, params, prompts, jax.random.key(0), num_tokens=n,
                                      stop_ids=(tok.eos_id,), pad_id=tok.pad_id, vocab_limit=tok.vocab_size))
    unlimited = np.asarray(decode.generate(graphdef, params, prompts, jax.random.key(0), num_tokens=n))
    assert unlimited.max() >= tok.vocab_size  # this model does reach for the padding ids
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        theirs = model.generate(torch.tensor(prompts), max_new_tokens=n, do_sample=False)[:, len(prompts[0]):]
    # Both stop a row at EOS (kept) and pad after it; transformers stops early once all rows did.
    theirs = np.pad(theirs.numpy(), ((0, 0), (0, n - theirs.shape[1])), constant_values=tok.pad_id)
    np.testing.assert_array_equal(theirs, ours)


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_exported_tokenizer_gives_gqlm_ids(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    texts = ["hello world", "  tabs\tand\nnewlines ", "ünïcødé 漢字 🙂", "<|bos|> <|eos|><|pad|> <s>", "",
             "a\x00b"]
    tok = ByteTokenizer() if kind == "byte" else train_bpe(["hello world, foo bar " * 40, "ünïcødé"], 300)
    m = tiny_model()
    export(m, random_params(m), tmp_path, tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    for text in texts:
        ids = hf_tok.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text), text
        assert hf_tok.decode(ids) == text


# ----------------------------------------------------------------------------- transformers -> gqlm


def save_hf_model(kind, out, seed=0, max_shard_size=None, **overrides):
    """A random tiny Llama / Mixtral saved by transformers, norm weights perturbed too."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    shape = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=300.0, rms_norm_eps=1e-5, initializer_range=0.2,
                 max_position_embeddings=64)
    shape.update(overrides)
    if kind == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **shape)
        model = transformers.MixtralForCausalLM(config)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(str(out), **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return str(out)


def import_sharded(hf_dir, mesh_sizes=(2, 2, 2, 1), **config_overrides):
    """(model config, params) of `hf_dir` loaded onto a mesh that shards every parameter axis."""
    config = base_config()
    config.init.from_hf = hf_dir
    config.mesh.update(dict(zip(("data", "fsdp", "tensor", "expert"), mesh_sizes)))
    config.mesh.rules = SHARDED_RULES
    config = hf_config.apply_hf_model(config_lib.apply_overrides(config, config_overrides))
    mesh = make_mesh(config.mesh)
    model = state_lib.build_model(config.model, config.mesh.rules, mesh)
    params = hf.load_params(hf_dir, config.model, model.abstract_params, model.param_shardings)
    return config.model, params


@pytest.mark.parity
@pytest.mark.parametrize("kind,tie,mesh_sizes", [("llama", True, (2, 2, 2, 1)), ("llama", False, (1, 4, 2, 1)),
                                                 ("mixtral", False, (2, 2, 1, 2))])
def test_import_matches_transformers(tmp_path, kind, tie, mesh_sizes):
    hf_dir = save_hf_model(kind, tmp_path, tie_word_embeddings=tie)
    m, params = import_sharded(hf_dir, mesh_sizes)
    assert m.tie_embeddings == tie and bool(m.moe.num_experts) == (kind == "mixtral")
    q = params["blocks"][0]["attn"]["q"]
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.size < q.size  # really sharded
    ids = random_ids(m.vocab_size)
    ours = gqlm_logits(m, jax.device_get(params), ids)
    error = np.max(np.abs(ours - hf_logits(hf_dir, ids)))
    print(f"{kind} import (tied={tie}): max abs logit error {error:.2e} (logits std {np.std(ours):.2f})")
    assert error <= TOLERANCE


@pytest.mark.parity
def test_import_reads_shards_and_prefers_model_safetensors_as_transformers_does(tmp_path):
    """A sharded checkpoint (index + shards) imports; a directory holding both a model.safetensors
    and a (stale) index of other shards gives the weights transformers loads: model.safetensors'."""
    import shutil
    sharded = save_hf_model("llama", tmp_path / "sharded", seed=1, max_shard_size="20KB")
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    both = save_hf_model("llama", tmp_path / "both")
    for name in os.listdir(sharded):
        if name.startswith("model-") or name == "model.safetensors.index.json":
            shutil.copy(os.path.join(sharded, name), both)
    ids = random_ids(96)
    for hf_dir in (sharded, both):
        m, params = import_sharded(hf_dir)
        assert np.max(np.abs(gqlm_logits(m, jax.device_get(params), ids) - hf_logits(hf_dir, ids))) <= TOLERANCE


@pytest.mark.parametrize("moe,overrides", [(False, {}), (True, {"tie_embeddings": False}),
                                           (False, {"param_dtype": "bfloat16"})], ids=["dense", "moe", "bf16"])
def test_export_import_export_is_bit_identical(tmp_path, moe, overrides):
    m = tiny_model(moe=moe, **overrides)
    first = export(m, random_params(m), tmp_path / "first")
    mesh_sizes = (2, 2, 1, 2) if moe else (2, 2, 2, 1)
    m2, params = import_sharded(first, mesh_sizes, **{"model.param_dtype": m.param_dtype})  # a training choice
    second = export(m2, params, tmp_path / "second")
    for name in ("config.json", MODEL_FILE, "tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(first, name), "rb") as a, open(os.path.join(second, name), "rb") as b:
            assert a.read() == b.read(), name


@pytest.mark.parity
def test_lm_task_starts_from_the_hf_weights(tmp_path):
    """`--config.init.from_hf` through the runner's experiment and the LM task's init_state."""
    hf_dir = save_hf_model("llama", tmp_path / "hf", vocab_size=384)
    config = smoke_config()
    for key in ("embed_dim", "num_layers", "num_heads", "num_kv_heads", "mlp_dim"):  # config.json's shape
        config.model[key] = base_config().model[key]
    config.init.from_hf = hf_dir
    exp = build_experiment(config, LMTask())
    assert (exp.config.model.embed_dim, exp.config.model.mlp_dim, exp.config.model.num_kv_heads) == (32, 40, 2)
    with jax.set_mesh(exp.mesh):
        state = LMTask().init_state(exp)
    with Checkpoint(hf_dir) as ckpt:
        embed = ckpt.read("model.embed_tokens.weight", (slice(None), slice(None)))
    np.testing.assert_array_equal(np.asarray(state.params["embed"]["table"]), embed)
    assert int(state.step) == 0


# ----------------------------------------------------------------------------- refusals and bad inputs


@pytest.mark.parametrize("overrides,key", [
    ({"position": "alibi"}, "model.position"),
    ({"position": "none"}, "model.position"),
    ({"moe.shared_expert": True}, "model.moe.shared_expert"),
    ({"moe.every": 2}, "model.moe.every"),
    ({"moe.layers": (1,)}, "model.moe.layers"),
    ({"moe.dispatch": "capacity"}, "model.moe.dispatch"),
])
def test_export_refuses_what_hf_cannot_express(overrides, key):
    config = base_config()
    config.model = tiny_model(moe=any(k.startswith("moe.") for k in overrides), **overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        hf.check_exportable(config)
    assert "\n" not in str(e.value)


def test_export_refuses_the_gqvae_tokenizer():
    config = base_config()
    config.data.tokenizer = "gqvae:/some/dir"
    with pytest.raises(ConfigError, match=r"data\.tokenizer.*'gqvae'"):
        hf.check_exportable(config)


def test_export_into_an_existing_directory(tmp_path, monkeypatch):
    """A previous export is replaced byte for byte by a fresh one; a directory with other files is
    refused untouched; an export that fails half-way leaves neither files nor a directory behind."""
    m = tiny_model()
    first, second = random_params(m, seed=0), random_params(m, seed=1)
    again, fresh = export(m, first, tmp_path / "again"), export(m, second, tmp_path / "fresh")
    export(m, second, again)  # a previous export's directory: replaced
    for name in hf.EXPORT_FILES:
        with open(os.path.join(again, name), "rb") as a, open(os.path.join(fresh, name), "rb") as b:
            assert a.read() == b.read(), name
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"already holds 'model\.safetensors\.index\.json'"):
        export(m, first, tmp_path / "other")
    assert os.listdir(tmp_path / "other") == ["model.safetensors.index.json"]

    def broken(*args):
        raise OSError("disk full")
    monkeypatch.setattr(hf.hf_tokenizer, "export_tokenizer", broken)  # the last file written
    with pytest.raises(OSError, match="disk full"):
        export(m, first, tmp_path / "failed")
    assert sorted(os.listdir(tmp_path)) == ["again", "fresh", "other"]


def write_config(hf_dir, **changes):
    path = os.path.join(hf_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        config.pop(key)
    with open(path, "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "gpt2"}, "model_type='gpt2'"),
    ({"hidden_size": None}, "lacks 'hidden_size'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_type='linear'"),
    ({"num_key_value_heads": 3}, "num_kv_heads=3"),
    ({"hidden_size": "32"}, "model.embed_dim"),
])
def test_import_rejects_a_bad_config_json(tmp_path, changes, message):
    m = tiny_model()
    out = export(m, random_params(m), tmp_path)
    write_config(out, **changes)
    config = base_config()
    config.init.from_hf = out
    with pytest.raises(ConfigError, match="init.from_hf") as e:
        hf_config.apply_hf_model(config)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_import_without_config_json_or_weights(tmp_path):
    config = base_config()
    config.init.from_hf = str(tmp_path)
    with pytest.raises(ConfigError, match=r"init\.from_hf=.*has no config\.json"):
        config_lib.validate(config, 8)
    m = tiny_model()
    out = export(m, random_params(m), tmp_path / "hf")
    os.remove(os.path.join(out, MODEL_FILE))
    with pytest.raises(ConfigError, match="has neither model.safetensors"):
        import_sharded(out)


def test_conflicting_override_names_the_key(tmp_path):
    m = tiny_model()
    out = export(m, random_params(m), tmp_path)
    config = base_config()
    config.init.from_hf = out
    config.model.num_layers = 3
    with pytest.raises(ConfigError, match=r"model\.num_layers=3 conflicts with init\.from_hf.*gives 2"):
        hf_config.apply_hf_model(config)
    config.model.num_layers = 2  # the same value is no conflict
    assert hf_config.apply_hf_model(config).model.embed_dim == 32


def test_shape_mismatch_names_the_tensor(tmp_path):
    m = tiny_model()
    out = export(m, random_params(m), tmp_path)
    write_config(out, intermediate_size=64)
    with pytest.raises(ConfigError, match=r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \[48, 32\], "
                                          r"config\.json implies \[64, 32\]"):
        import_sharded(out)
    write_config(out, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, model_type="mixtral")
    with pytest.raises(ConfigError, match=r"has no tensor 'model\.layers\.0\.block_sparse_moe\.gate\.weight'"):
        import_sharded(out)


def test_unknown_tensors_are_refused(tmp_path):
    m = tiny_model(tie_embeddings=False)
    out = export(m, random_params(m), tmp_path)
    write_config(out, tie_word_embeddings=True)  # lm_head.weight is then ignored, as transformers does
    import_sharded(out)
    write_config(out, tie_word_embeddings=False, num_hidden_layers=1)
    with pytest.raises(ConfigError, match=r"has tensor 'model\.layers\.1\..*' that gqlm's model has no place for"):
        import_sharded(out)


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parity
def test_export_cli_round_trip(tmp_path):
    """Train two steps, export with `python -m gqlm.export`, compare logits; a refused override exits 2."""
    workdir, out = str(tmp_path / "run"), str(tmp_path / "hf")
    overrides = {"train.steps": 2, "train.checkpoint_every": 2, "train.sample_tokens": 0}
    train(config_lib.apply_overrides(smoke_config(), overrides), workdir, LMTask())
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "gqlm.export", "--workdir", workdir, "--out", out]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    refused = subprocess.run(command + ["--config.model.position=alibi"], cwd=ROOT, capture_output=True, text=True,
                             env=env)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert "model.position='alibi' cannot be exported" in refused.stderr
    exp, _, state = restore_trained(workdir, LMTask())
    ids = random_ids(259)
    error = np.max(np.abs(gqlm_logits(exp.config.model, jax.device_get(state.params), ids) - hf_logits(out, ids)))
    assert error <= TOLERANCE


@pytest.mark.parity
def test_a_run_started_from_hf_is_read_back_without_the_hf_directory(tmp_path):
    import shutil
    hf_dir = save_hf_model("llama", tmp_path / "hf", vocab_size=384)
    config = smoke_config()
    with config.unlocked():
        for key in ("embed_dim", "num_layers", "num_heads", "num_kv_heads", "mlp_dim"):  # config.json's shape
            config.model[key] = base_config().model[key]
        config.init.from_hf = hf_dir
        config.train.update({"steps": 2, "checkpoint_every": 2, "eval_every": 2, "sample_tokens": 0})
    train(config, str(tmp_path / "run"), LMTask())
    shutil.rmtree(hf_dir)
    exp, step, state = restore_trained(str(tmp_path / "run"), LMTask())
    assert step == 2 and exp.config.init.from_hf == ""
    assert (exp.config.model.embed_dim, exp.config.model.mlp_dim) == (32, 40)  # the HF model's shape, as saved
