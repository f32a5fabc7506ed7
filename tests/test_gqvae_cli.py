"""`gqlm.tokenize --kind gqvae` and an LM trained on a GQ-VAE tokenizer (`data.tokenizer=gqvae:DIR`)."""

import os
import subprocess
import sys
import types

import jax
import pytest

from gqlm import tokenize
from gqlm.config import ConfigError, base_config, load_experiment
from gqlm.data import corpora
from gqlm.tokenizers import load_tokenizer
from gqlm.tokenizers.base import TokenizerDirError
from gqlm.tokenizers.gqvae.tokenizer import GQVAETokenizer
from gqlm.train.experiment import build_experiment
from gqlm.train.tasks.gqvae.checkpoint import CheckpointError, load_checkpoint
from gqlm.train.tasks.gqvae.train import train_gqvae
from gqlm.train.tasks.lm import LMTask

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
LINES = ["the cat and the hat; the rat sat on the mat.", "then the man ran to the van and the cat sat."]
TEXT = "\n".join(LINES[i % 2] + f" line {i}" for i in range(120)) + "\n"  # ~5.5 KB, one document
VOCAB = 259 + 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gqvae_cli")
    corpus = tmp / "corpus.txt"
    corpus.write_text(TEXT)
    c = base_config()
    c.gqvae.update(dict(embed_dim=16, num_heads=2, encoder_layers=1, gater_layers=1, mlp_dim=32,
                        codebook_size=32, max_token_len=4, max_pretoken_len=8, batch_size=32,
                        learning_rate=3e-3, warmup_steps=5, reseed_every=5))
    ckpt = str(tmp / "ckpt")
    train_gqvae(c, LINES, ckpt, 25)
    data = base_config().data
    data.corpus, data.glob, data.data_dir = "text_files", str(corpus), str(tmp / "tfds")
    return tmp, ckpt, data


def run_cli(module, *args):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def tokenize_args(data, *extra):
    return ["--kind=gqvae", "--corpus=text_files", f"--glob={data.glob}", f"--data_dir={data.data_dir}", *extra]


@pytest.mark.slow
def test_tokenize_cli_builds_the_same_tokenizer_as_the_library(setup):
    tmp, ckpt, data = setup
    out = str(tmp / "tok_cli")
    r = run_cli("gqlm.tokenize", *tokenize_args(data, f"--checkpoint={ckpt}", f"--vocab_size={VOCAB}", f"--out={out}"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"vocab_size={VOCAB}" in r.stdout and "validation bytes/token" in r.stdout
    tok = load_tokenizer(f"gqvae:{out}")
    # The CLI builds its vocabulary on the corpus' train split: the same as the library call.
    reference = GQVAETokenizer.build(*load_checkpoint(ckpt), VOCAB, corpora.load_documents(data, "train")[:])
    assert isinstance(tok, GQVAETokenizer) and tok.tokens == reference.tokens and tok.vocab_size == VOCAB
    assert tok.encode(TEXT) == reference.encode(TEXT) and tok.decode(tok.encode(TEXT)) == TEXT
    # The printed bytes/token is the validation split's, computed independently here.
    valid = corpora.load_documents(data, "validation")[:]
    ids = [tok.encode(t) for t in valid]
    expected = sum(len(t.encode()) for t in valid) / sum(map(len, ids))
    assert f"validation bytes/token: {expected:.3f}" in r.stdout


def test_tokenize_cli_rejects_an_lm_workdir_in_one_line(setup):
    tmp, _, data = setup
    lm_workdir = tmp / "lm_workdir"
    (lm_workdir / "checkpoints").mkdir(parents=True)
    r = run_cli("gqlm.tokenize", *tokenize_args(data, f"--checkpoint={lm_workdir}", "--out", str(tmp / "x")))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert str(lm_workdir) in last and "not a GQ-VAE checkpoint" in last and "LM workdir" in last
    assert "Traceback" not in r.stderr and not (tmp / "x").exists()


def flags_like(**values):
    return types.SimpleNamespace(**{"checkpoint": "", "vocab_size": VOCAB, "out": "", **values})


def one_line_error(exc_type, fn, *args):
    with pytest.raises(exc_type) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_builder_bad_inputs_name_the_path_or_key(setup):
    tmp, ckpt, _ = setup
    out = str(tmp / "never")
    msg = one_line_error(ConfigError, tokenize.build_gqvae, LINES, flags_like(out=out))
    assert "--checkpoint" in msg
    missing = str(tmp / "no_such_ckpt")
    msg = one_line_error(CheckpointError, tokenize.build_gqvae, LINES, flags_like(checkpoint=missing, out=out))
    assert missing in msg and "does not exist" in msg
    msg = one_line_error(ConfigError, tokenize.build_gqvae, LINES,
                         flags_like(checkpoint=ckpt, vocab_size=100_000, out=out))
    assert "vocab_size=100000" in msg and "distinct multi-byte segments" in msg
    assert not os.path.exists(out)


def test_vocab_size_limit_is_the_number_of_distinct_segments(setup):
    _, ckpt, _ = setup
    # Independent count: distinct multi-byte strings the used codes end on, all of each code's.
    probe = GQVAETokenizer.build(*load_checkpoint(ckpt), 259, LINES)
    segments = probe._segment_pretokens(sorted({p for t in LINES for p in tokenize_pretokens(t)}))
    by_code = {}
    for segs in segments.values():
        for seg, code in segs:
            by_code.setdefault(code, set()).add(seg)
    assert GQVAETokenizer.build(*load_checkpoint(ckpt), VOCAB, LINES).vocab_size == VOCAB
    upper = 259 + len({s for strings in by_code.values() for s in strings if len(s) > 1})
    assert GQVAETokenizer.build(*load_checkpoint(ckpt), upper, LINES).vocab_size == upper
    with pytest.raises(ConfigError, match=f"vocab_size={upper + 1} exceeds"):
        GQVAETokenizer.build(*load_checkpoint(ckpt), upper + 1, LINES)


def tokenize_pretokens(text):
    from gqlm.tokenizers.gqvae.pretokenize import pretokens
    return pretokens(text)


@pytest.mark.slow
def test_lm_trains_on_a_gqvae_tokenizer(setup):
    from gqlm.train.loop import train
    tmp, ckpt, data = setup
    tok_dir = str(tmp / "tok_lm")
    GQVAETokenizer.build(*load_checkpoint(ckpt), VOCAB, LINES).save(tok_dir)
    config = load_experiment(f"experiments/gqvae_lm_compare.py:gqvae:{tok_dir},bpt=2,smoke")
    assert config.data.tokenizer == f"gqvae:{tok_dir}" and config.data.seq_len == 32
    config.data.corpus, config.data.glob, config.data.data_dir = data.corpus, data.glob, data.data_dir
    config.train.steps = config.train.eval_every = config.train.checkpoint_every = 40  # smoke's 6: too few to learn
    metrics = train(config, str(tmp / "lm"), LMTask())
    untrained = untrained_validation(config)
    assert metrics["bytes_per_token"] == untrained["bytes_per_token"] > 1.0  # the same validation tokens
    print(f"validation bpb: untrained {untrained['bpb']:.3f}, after {config.train.steps} steps {metrics['bpb']:.3f}")
    assert metrics["bpb"] < 0.7 * untrained["bpb"]  # measured: 5.50 -> 3.10


def untrained_validation(config):
    """The loop's validation metrics of the LM at its initial parameters (the same seed as `train`)."""
    task = LMTask()
    exp = build_experiment(config, task)
    with jax.set_mesh(exp.mesh):
        return task.evaluator(exp)(task.init_state(exp).params, task.eval_batches(exp))


def test_compare_experiment_bad_tokenizer_dir_names_it(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path / "nope")):
        load_experiment(f"experiments/gqvae_lm_compare.py:gqvae:{tmp_path / 'nope'}")
    with pytest.raises(TokenizerDirError, match="does not exist"):
        load_tokenizer(f"gqvae:{tmp_path / 'nope'}")
