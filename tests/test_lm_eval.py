"""lm-evaluation-harness (gqlm/eval/harness.py, gqlm/lm_eval.py): the `gqlm` model class against
NumPy log-softmax over full forward passes of the trained model, the offline task shipped in
tests/lm_eval_task/ through gqlm and through lm-eval's `hf` backend on the exported model (two
routes, one answer), and the command line with its one-line errors. Nothing is downloaded."""

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from gqlm.eval.harness import GQLM, padded_length  # noqa: E402
from gqlm.interop import hf  # noqa: E402
from gqlm.train.checkpoint import restore_trained  # noqa: E402
from gqlm.train.loop import train  # noqa: E402
from gqlm.train.tasks.lm import LMTask  # noqa: E402
from tests.helpers import CPU8, ROOT, smoke_config  # noqa: E402

TASK_DIR = os.path.join(os.path.dirname(__file__), "lm_eval_task")
BOS, EOS = 256, 257  # the byte tokenizer's
WINDOW = 256  # the smoke model's max_seq_len
STEPS = 40
ENV = {**os.environ, **CPU8, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A byte-level smoke run, a few seconds of training from a wide init (model.init_std=0.5): its
    predictions depend on the context and its greedy continuations differ (the default init
    trained this briefly writes only spaces)."""
    path = str(tmp_path_factory.mktemp("lm_eval") / "run")
    train(smoke_config(**{"train.steps": STEPS, "train.checkpoint_every": STEPS, "model.init_std": 0.5}), path, LMTask())
    return path


@pytest.fixture(scope="module")
def model(workdir):
    return GQLM(workdir, batch_size=8)


class Reference:
    """Log-probs from one full forward pass of a [1, WINDOW] row on one device, softmax in NumPy."""

    def __init__(self, workdir):
        exp, _, state = restore_trained(workdir, LMTask())
        params = jax.device_get(state.params)
        graphdef = exp.model.graphdef

        @jax.jit
        def logits(ids_1T):
            positions_1T = jnp.arange(WINDOW)[None]
            return nnx.merge(graphdef, params)(ids_1T, positions_1T, jnp.ones_like(ids_1T))[0][0]
        self._logits = logits

    def logprobs_TV(self, ids):
        """log p(. | ids[:t+1]) for each t (right-padding is after every scored position: causal)."""
        assert len(ids) <= WINDOW
        padded = np.zeros((1, WINDOW), np.int32)
        padded[0, :len(ids)] = ids
        x = np.asarray(self._logits(padded), np.float64)[:len(ids)]
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    def score(self, ids, num_scored):
        """(summed log-prob of the last `num_scored` tokens of `ids`, were they each the argmax)."""
        lp_TV = self.logprobs_TV(ids[:-1])[-num_scored:]
        targets = np.asarray(ids[-num_scored:])
        return lp_TV[np.arange(num_scored), targets].sum(), bool((lp_TV.argmax(-1) == targets).all())

    def greedy(self, ids, num_tokens):
        out = []
        for _ in range(num_tokens):
            out.append(int(self.logprobs_TV(ids + out)[-1].argmax()))
            if out[-1] == EOS:
                break
        return bytes(i for i in out if i < 256).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def ref(workdir):
    return Reference(workdir)


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def encode(text):
    return list(text.encode("utf-8"))


# ----------------------------------------------------------------------------- the model class


def test_loglikelihood_matches_full_forward(model, ref):
    long_context = "ROMEO:\nBut soft, what light through yonder window breaks? " * 8  # > WINDOW bytes
    pairs = [("ROMEO:\nBut soft, what light", " through yonder window"), ("HAMLET:\nTo be, or not to be, ", "that"),
             ("", "Friends, Romans, countrymen"), ("a", "b"), (long_context, "It is the east"),
             ("JULIET:\n", "O Romeo"), ("All the world's a stage", ",\nAnd all the men and women merely players"),
             ("MACBETH:\nTomorrow, and tomorrow, and", " tomorrow"), ("x" * 40, "y" * 30)]
    context = "HAMLET:\nSomething is rotten in the state of"  # + its greedy next byte: a greedy request
    pairs.append((context, chr(int(ref.logprobs_TV(encode(context))[-1].argmax()))))
    results = model.loglikelihood([request("loglikelihood", c, x) for c, x in pairs], disable_tqdm=True)
    assert len(pairs) > model.batch_size == 8  # two batches, the second padded with empty rows
    for (context, continuation), (logp, greedy) in zip(pairs, results):
        stripped = context.rstrip()  # trailing whitespace moves to the continuation, whole text split
        ctx_ids = encode(stripped) if context else [BOS]
        cont_ids = encode(context[len(stripped):] + continuation)
        ids = (ctx_ids + cont_ids)[-(WINDOW + 1):]  # left-truncated to the window, as lm-eval's hf
        want_logp, want_greedy = ref.score(ids, len(cont_ids))
        np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5, err_msg=repr((context, continuation)))
        assert greedy == want_greedy, (context, continuation)
    assert results[-1][1] and not all(g for _, g in results)


def rolling_reference(ref, ids, window):
    """Each token scored once: the first `window` after BOS, then `window` at a time, each with a
    full window of the tokens before it (lm-eval's disjoint rolling windows)."""
    total = ref.score([BOS] + ids[:window], min(window, len(ids)))[0]
    start = window
    while start < len(ids):
        end = min(start + window, len(ids))
        total += ref.score(ids[end - window - 1:end], end - start)[0]
        start = end
    return total


def test_loglikelihood_rolling_uses_windows(workdir, model, ref):
    short = "Now is the winter of our discontent\nMade glorious summer by this sun of York."
    long = ("To be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer\n"
            "The slings and arrows of outrageous fortune")
    window16 = GQLM(workdir, batch_size=8, max_length=16)
    requests = [request("loglikelihood_rolling", t) for t in (short, long)]
    full = model.loglikelihood_rolling(requests, disable_tqdm=True)
    windowed = window16.loglikelihood_rolling(requests, disable_tqdm=True)
    for text, got, got16 in zip((short, long), full, windowed):
        ids = encode(text)
        assert 3 * 16 < len(ids) < WINDOW
        np.testing.assert_allclose(got, ref.score([BOS] + ids, len(ids))[0], rtol=1e-5)
        np.testing.assert_allclose(got16, rolling_reference(ref, ids, 16), rtol=1e-5)
    assert np.min(np.abs(np.subtract(windowed, full)) / np.abs(full)) > 1e-4  # shorter contexts: other scores


def test_generate_until_is_greedy_and_stops_at_the_stop_strings(model, ref):
    prompts = ["ROMEO:\n", "HAMLET:\nTo be, or not to be", "All the world's a stage,\nAnd all the men", "O"]
    free = [ref.greedy(encode(p), 20) for p in prompts]
    gen = model.generate_until([request("generate_until", p, {"until": [], "max_gen_toks": 20}) for p in prompts],
                               disable_tqdm=True)
    assert gen == free and len(set(free)) > 1
    stops = [free[0][5:7], free[1][3]]  # two tokens (cut on the host); one token (also stops its row on device)
    assert [len(encode(s)) for s in stops] == [2, 1]
    gen = model.generate_until([request("generate_until", p, {"until": stops, "max_gen_toks": 20, "do_sample": False})
                                for p in prompts], disable_tqdm=True)
    expected = [text.split(stops[0])[0].split(stops[1])[0] for text in free]
    assert gen == expected
    assert len(gen[0]) <= 5 < len(free[0]) and len(gen[1]) <= 3 < len(free[1])
    assert not any(s in g for g in gen for s in stops)


def test_a_few_padded_lengths_and_whole_rows_per_device(workdir):
    assert [padded_length(n, 256) for n in (1, 16, 17, 33, 200, 256)] == [16, 16, 32, 64, 256, 256]
    assert padded_length(90, 100) == 100 and padded_length(3, 8) == 8
    model = GQLM(workdir, batch_size=3)
    assert model.batch_size == 8  # whole rows for each of the 8 data-parallel devices
    model.loglikelihood([request("loglikelihood", "x" * n, "y") for n in range(17, 32)], disable_tqdm=True)
    assert model.scorer._cache_size() == 1  # 15 lengths, 2 batches, one padded shape: one compile


# ----------------------------------------------------------------------------- two routes, one answer


def evaluate(model_name, model_args):
    manager = TaskManager(include_path=TASK_DIR, include_defaults=False)
    return lm_eval.simple_evaluate(model=model_name, model_args=model_args, tasks=["gqlm_shakespeare"],
                                   task_manager=manager, bootstrap_iters=0, log_samples=True)


@pytest.mark.slow
@pytest.mark.parity
def test_gqlm_and_the_exported_hf_model_give_the_same_scores(workdir, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    exp, _, state = restore_trained(workdir, LMTask())
    with jax.set_mesh(exp.mesh):
        hf.export_model(state.params, exp.config.model, exp.tokenizer, str(tmp_path))
    ours = evaluate("gqlm", {"workdir": workdir, "batch_size": 8})
    theirs = evaluate("hf", {"pretrained": str(tmp_path), "device": "cpu", "dtype": "float32", "batch_size": 8})
    assert set(ours["results"]) == {"gqlm_shakespeare_mc", "gqlm_shakespeare_ppl", "gqlm_shakespeare_gen"}
    for task, metrics in theirs["results"].items():
        for name, value in metrics.items():
            if name.startswith(("acc", "exact_match")) and "stderr" not in name:
                assert ours["results"][task][name] == value, (task, name)
            elif name.startswith(("word_perplexity", "byte_perplexity", "bits_per_byte")) and "stderr" not in name:
                np.testing.assert_allclose(ours["results"][task][name], value, rtol=1e-4, err_msg=name)
    for task in theirs["samples"]:  # and each request's answer
        for a, b in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            if task.endswith("_gen"):
                assert a["resps"] == b["resps"]
            else:
                np.testing.assert_allclose(np.array(a["resps"], float), np.array(b["resps"], float), rtol=1e-4)
    ppl = {k: (ours["results"]["gqlm_shakespeare_ppl"][k], v) for k, v in theirs["results"]["gqlm_shakespeare_ppl"].items()
           if k.endswith("perplexity,none") or k == "bits_per_byte,none"}
    print("gqlm vs hf:", {k: f"{a:.9g} vs {b:.9g} (rel {abs(a - b) / abs(b):.1e})" for k, (a, b) in ppl.items()},
          "acc", ours["results"]["gqlm_shakespeare_mc"]["acc,none"])
    hf_bos = transformers.AutoTokenizer.from_pretrained(str(tmp_path), add_bos_token=True)
    text = "ROMEO:\nBut soft, what light"
    assert hf_bos.encode(text) == GQLM(workdir, add_bos_token=True).tok_encode(text) == [BOS] + encode(text)


# ----------------------------------------------------------------------------- the command line


def run_cli(*args, python_prefix=()):
    command = [sys.executable, *python_prefix, "-m", "gqlm.lm_eval", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=ENV)


@pytest.mark.slow
def test_cli_writes_the_results_json(workdir, tmp_path):
    out = tmp_path / "results.json"
    done = run_cli("--workdir", workdir, "--tasks", "gqlm_shakespeare_mc,gqlm_shakespeare_ppl", "--include_path",
                   TASK_DIR, "--limit", "5", "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["n-samples"]["gqlm_shakespeare_mc"]["effective"] == 5
    assert 0 <= results["results"]["gqlm_shakespeare_mc"]["acc,none"] <= 1
    assert results["results"]["gqlm_shakespeare_ppl"]["bits_per_byte,none"] > 0
    assert results["config"]["gqlm_step"] == STEPS and "gqlm_shakespeare_mc" in done.stdout  # lm-eval's table


def test_cli_refuses_a_workdir_without_checkpoints(tmp_path):
    empty, out = tmp_path / "empty", tmp_path / "out.json"
    empty.mkdir()
    done = run_cli("--workdir", str(empty), "--tasks", "gqlm_shakespeare_mc", "--output", str(out))
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert str(empty) in done.stderr and "no checkpoints" in done.stderr
    assert not out.exists() and not any(empty.iterdir())


@pytest.mark.slow
def test_cli_refuses_an_unknown_task_before_loading_the_model(workdir, tmp_path):
    out = tmp_path / "out.json"
    before = sorted(os.listdir(workdir))
    done = run_cli("--workdir", workdir, "--tasks", "gqlm_shakespeare_mc,no_such_task_xyz", "--include_path", TASK_DIR,
                   "--output", str(out))
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "'no_such_task_xyz'" in done.stderr
    assert not out.exists() and sorted(os.listdir(workdir)) == before


@pytest.mark.parametrize("flag", ["--limit=0", "--batch_size=0", "--num_fewshot=-1"])
def test_cli_refuses_counts_out_of_range_before_loading_the_model(tmp_path, flag):
    empty, out = tmp_path / "empty", tmp_path / "out.json"  # no checkpoints: the flag is checked first
    empty.mkdir()
    done = run_cli("--workdir", str(empty), "--tasks", "gqlm_shakespeare_mc", "--output", str(out), flag)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert flag in done.stderr and not out.exists()


def test_cli_without_the_eval_extra_says_how_to_install_it(tmp_path):
    hide = "import sys, runpy; sys.modules['lm_eval'] = None; sys.argv[0] = 'gqlm.lm_eval'; " \
           "runpy.run_module('gqlm.lm_eval', run_name='__main__')"
    done = subprocess.run([sys.executable, "-c", hide, "--workdir", str(tmp_path), "--tasks", "x"], cwd=ROOT,
                          capture_output=True, text=True, env=ENV)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "pip install -e .[eval]" in done.stderr
