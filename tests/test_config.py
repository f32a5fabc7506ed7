"""Config schema: validation table, override parsing, experiment loading, mesh sizes."""

import json
import os

import pytest

from gqlm import config as config_lib
from gqlm.config import ConfigError

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")


def make(**overrides):
    config = config_lib.base_config()
    config.lock()
    return config_lib.apply_overrides(config, dict(overrides))


BAD_CONFIGS = [
    ({"model.num_heads": 6, "model.embed_dim": 512}, "model.num_heads=6 does not divide model.embed_dim=512"),
    ({"model.num_kv_heads": 3}, "model.num_kv_heads=3"),
    ({"model.position": "xpos"}, "model.position"),
    ({"model.attention_impl": "flash"}, "model.attention_impl"),
    ({"model.compute_dtype": "float16"}, "model.compute_dtype"),
    ({"data.seq_len": 2048}, "data.seq_len=2048 exceeds model.max_seq_len=1024"),
    ({"data.batch_size": 12}, "data.batch_size=12 is not divisible"),
    ({"data.batch_size": 16, "train.grad_accum": 4}, "train.grad_accum=4"),
    ({"data.corpus": "wikipedia"}, "data.corpus"),
    ({"data.corpus": "text_files"}, "data.glob"),
    ({"optimizer.learning_rate": 0.0}, "optimizer.learning_rate"),
    ({"optimizer.learning_rate": -1e-3}, "optimizer.learning_rate"),
    ({"optimizer.b1": 1.0}, "optimizer.b1"),
    ({"optimizer.b2": -0.1}, "optimizer.b2"),
    ({"optimizer.precondition_frequency": 0}, "optimizer.precondition_frequency"),
    ({"train.nonfinite": "ignore"}, "train.nonfinite"),
    ({"train.steps": 0}, "train.steps"),
    ({"mesh.data": 3}, "mesh sizes"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "only one mesh axis may be -1"),
    ({"mesh.data": -1, "mesh.fsdp": 3}, "mesh.data"),
    ({"mesh.tensor": 0}, "mesh.tensor=0"),
    ({"model.moe.num_experts": 6, "mesh.data": 2, "mesh.expert": 4}, "model.moe.num_experts=6 is not divisible by mesh.expert=4"),
    ({"model.moe.num_experts": 4, "model.moe.top_k": 5}, "model.moe.top_k=5"),
    ({"model.moe.num_experts": 4, "model.moe.capacity_factor": 0.0}, "model.moe.capacity_factor"),
    ({"model.moe.num_experts": 4, "model.moe.layers": (7,)}, "model.moe.layers contains 7"),
    # Each of these once passed validation and failed later: a traceback from inside the model or
    # JAX, or (keep_checkpoints=0) orbax deleting every checkpoint, eval_batches=0 a 0.0 "loss".
    ({"model.embed_dim": 60, "model.num_heads": 4}, "model.position='rope' needs an even head dim"),
    ({"model.head_dim": 7}, "model.head_dim=7 gives 7"),
    ({"model.num_kv_heads": -1}, "model.num_kv_heads=-1"),
    ({"model.head_dim": -8}, "model.head_dim=-8"),
    ({"model.moe.num_experts": 4, "model.moe.mlp_dim": -4}, "model.moe.mlp_dim=-4"),
    ({"model.moe.num_experts": 4, "model.moe.router_jitter": -0.5}, "model.moe.router_jitter=-0.5"),
    ({"train.keep_checkpoints": 0}, "train.keep_checkpoints=0"),
    ({"train.keep_every": -1}, "train.keep_every=-1"),
    ({"train.eval_batches": 0}, "train.eval_batches=0"),
    ({"train.sample_tokens": -1}, "train.sample_tokens=-1"),
    ({"model.moe.num_experts": 4, "model.num_layers": 2, "model.moe.every": 3}, "model.moe.every=3 makes none"),
    ({"model.attention_impl": "cudnn"}, "model.attention_impl='cudnn' needs model.compute_dtype='bfloat16'"),
    ({"optimizer.eps": 0.0}, "optimizer.eps=0.0"),
    ({"optimizer.eps": -1.0}, "optimizer.eps=-1.0"),
    ({"optimizer.learning_rate": float("inf")}, "optimizer.learning_rate=inf"),
    ({"mesh.rules": (("batch", "foo"),)}, "unknown mesh axis 'foo'"),
    ({"mesh.rules": (("embed", ("fsdp", "model")),)}, "unknown mesh axis 'model'"),
]


def test_odd_head_dims_are_fine_without_rope():
    config_lib.validate(make(**{"model.head_dim": 7, "model.position": "alibi"}), num_devices=8)
    config_lib.validate(make(**{"model.embed_dim": 60, "model.num_heads": 4, "model.position": "none"}),
                        num_devices=8)


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS)
def test_validation_names_the_key(overrides, message):
    config = make(**overrides)
    with pytest.raises(ConfigError) as info:
        config_lib.validate(config, num_devices=8)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_default_config_is_valid():
    config_lib.validate(make(), num_devices=8)


@pytest.mark.parametrize("key,text,error", [
    ("model.nope", "1", "unknown config key 'model.nope'"),
    ("nosection.x", "1", "unknown config key 'nosection'"),
    ("model.num_layers", "four", "flag --config.model.num_layers=four"),
    ("model.num_layers", "2.5", "flag --config.model.num_layers=2.5"),
    ("model.tie_embeddings", "maybe", "Non-boolean argument"),
    ("model", "3", "is a section"),
])
def test_bad_override_strings(key, text, error):
    with pytest.raises(ConfigError, match=error):
        config_lib.apply_override_strings(make(), {key: text})


@pytest.mark.parametrize("key,value,error", [
    ("model.nope", 1, "unknown config key 'model.nope'"),
    ("model.num_layers", "four", "model.num_layers' expects int"),
    ("model.num_layers", 2.5, "model.num_layers' expects int"),
    ("model", 3, "is a section"),
])
def test_bad_typed_overrides(key, value, error):
    with pytest.raises(ConfigError, match=error):
        config_lib.apply_overrides(make(), {key: value})


def test_override_strings_are_typed_by_the_schema():
    config = config_lib.apply_override_strings(make(), {
        "model.num_layers": "3", "optimizer.learning_rate": "1", "data.tokenizer": "bpe:/tmp/x",
        "model.tie_embeddings": "false", "model.moe.layers": "[1, 3]"})
    assert config.model.num_layers == 3
    assert config.optimizer.learning_rate == 1.0 and isinstance(config.optimizer.learning_rate, float)
    assert config.data.tokenizer == "bpe:/tmp/x"
    assert config.model.tie_embeddings is False
    assert config.model.moe.layers == (1, 3)


def test_mesh_fill_axis():
    assert config_lib.resolve_mesh_shape(make(**{"mesh.fsdp": 4}).mesh, 8) == {
        "data": 2, "fsdp": 4, "tensor": 1, "expert": 1}


def test_moe_layer_indices():
    assert config_lib.moe_layer_indices(make(**{"model.moe.num_experts": 4, "model.moe.every": 2}).model) == (1, 3)
    assert config_lib.moe_layer_indices(make(**{"model.moe.num_experts": 4, "model.moe.layers": (0,)}).model) == (0,)
    assert config_lib.moe_layer_indices(make().model) == ()


def test_load_experiment_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config_lib.load_experiment(str(tmp_path / "missing.py"))
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    with pytest.raises(ConfigError, match="failed to load"):
        config_lib.load_experiment(str(broken))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="no get_config"):
        config_lib.load_experiment(str(empty))


@pytest.mark.parametrize("name", ["tiny_cpu.py", "tiny_cpu.py:smoke", "dense_125m.py", "dense_1b.py", "dense.py:350m"])
def test_experiments_load_and_validate(name):
    config = config_lib.load_experiment(os.path.join(EXPERIMENTS, name))
    devices = 8 if "tiny" in name else 256
    config_lib.validate(config, num_devices=devices)


def test_config_json_round_trip():
    config = make(**{"model.moe.layers": (1, 2), "model.num_layers": 4})
    rebuilt = config_lib.config_from_dict(json.loads(config.to_json()))
    assert rebuilt.to_dict() == config.to_dict()
    assert rebuilt.mesh.rules == config_lib.DEFAULT_RULES


@pytest.mark.parametrize("saved, policy", [(False, "none"), (True, "full")])
def test_a_config_saved_with_the_old_boolean_remat_restores_as_its_policy(saved, policy):
    old = json.loads(make().to_json())
    old["model"]["remat"] = saved
    rebuilt = config_lib.config_from_dict(old)
    assert rebuilt.model.remat == policy
    config_lib.validate(rebuilt, num_devices=8)
