"""lm-evaluation-harness model `gqlm`: a training workdir's checkpoint scores and continues text
directly (no export), batched on the run's mesh.

    lm_eval.simple_evaluate(model="gqlm", model_args="workdir=DIR[,step=N]", tasks=[...])

Token semantics are those of lm-eval's `hf` backend on the exported model (`python -m gqlm.export`),
so the two routes give one answer: a request is encoded whole and split into context and
continuation (TemplateLM), an empty context is the BOS token, other text gets no BOS (the exported
tokenizer's default; `add_bos_token=True` prepends one, as it does for `hf`), the window is
`model.max_seq_len`, a longer request loses its left end, and `loglikelihood_rolling` uses
lm-eval's disjoint windows. Generation is greedy (sampled if a task sets `do_sample`) with the KV
cache (models/decode.py); the `until` strings cut the text afterwards, and those that are a single
token also stop their row on the device.

Batches: requests sorted longest first, `batch_size` rows (rounded up to a multiple of the
data-parallel devices; short batches padded with empty rows), each padded to the smallest of the
lengths 16, 32, 64, ... (capped at the window), so jit compiles once per length, not per request.
The rows are sharded over the mesh's batch axes, the parameters as in training. One process.
`device` and `max_batch_size` (which lm-eval passes to every model) are ignored: the run's mesh
decides placement.

B batch rows, T padded length, V vocab.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import lm_eval.models  # noqa: F401  lm-eval's own models first: the registry loads them only while empty
import numpy as np
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from gqlm import mesh as mesh_lib
from gqlm.config import ConfigDict, ConfigError
from gqlm.data.pipeline import to_global
from gqlm.interop.hf_tokenizer import SPECIAL_TOKENS
from gqlm.models.decode import generate
from gqlm.tokenizers.base import text_to_bytes
from gqlm.train.checkpoint import restore_trained
from gqlm.train.tasks.lm import LMTask

MIN_LENGTH = 16  # the shortest padded length
SAMPLING_KEYS = {"do_sample", "temperature", "top_k"}  # what sampled generation understands
# (context and continuation strings, or None for rolling windows; context ids; continuation ids)
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]


def padded_length(length: int, window: int) -> int:
    """The power of two >= `length` (at least MIN_LENGTH), capped at `window`."""
    return min(window, max(MIN_LENGTH, 1 << (length - 1).bit_length()))


def rows_multiple(sharding: jax.sharding.NamedSharding) -> int:
    """How many ways the batch axes split a batch's rows."""
    axes = sharding.spec[0] if len(sharding.spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([sharding.mesh.shape[a] for a in axes]))


def pack_rows(rows: Sequence[Sequence[int]], num_rows: int, length: int, pad_id: int) -> dict[str, np.ndarray]:
    """[num_rows, length] inputs/targets/positions/segment_ids of token rows (each scored on all
    but its first token), right-padded; missing rows are all padding (segment 0)."""
    batch = {k: np.zeros((num_rows, length), np.int32) for k in ("inputs", "targets", "segment_ids")}
    batch["inputs"][:] = pad_id
    for b, row in enumerate(rows):
        n = len(row) - 1
        batch["inputs"][b, :n], batch["targets"][b, :n], batch["segment_ids"][b, :n] = row[:-1], row[1:], 1
    batch["positions"] = np.broadcast_to(np.arange(length, dtype=np.int32), (num_rows, length)).copy()
    return batch


def make_scorer(graphdef: nnx.GraphDef, rules: Any, param_shardings: Any,
                batch_sharding: jax.sharding.NamedSharding) -> Callable:
    """jit(params, batch) -> (log-prob of each target [B, T] in float32, is it the argmax [B, T])."""
    def token_logprobs(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        model = nnx.merge(graphdef, params)
        logits_BTV, _ = model(batch["inputs"], batch["positions"], batch["segment_ids"], rules=rules)
        logits_BTV = logits_BTV.astype(jnp.float32)  # log-softmax without a second [B, T, V] array:
        target_BT = jnp.take_along_axis(logits_BTV, batch["targets"][..., None], axis=-1)[..., 0]
        logp_BT = target_BT - jax.nn.logsumexp(logits_BTV, axis=-1)
        return logp_BT, jnp.argmax(logits_BTV, axis=-1) == batch["targets"]
    return jax.jit(token_logprobs, in_shardings=(param_shardings, batch_sharding))


def sampling_of(kwargs: dict[str, Any]) -> tuple[float, int]:
    """(temperature, top_k) of normalized generation kwargs: (0, 0), greedy, unless `do_sample`."""
    if not kwargs.get("do_sample"):
        return 0.0, 0
    unknown = sorted(set(kwargs) - SAMPLING_KEYS)
    if unknown:
        raise ValueError(f"gqlm samples with temperature and top_k only; the task also sets {', '.join(unknown)}")
    return float(kwargs.get("temperature") or 1.0), int(kwargs.get("top_k") or 0)


@register_model("gqlm")
class GQLM(TemplateLM):
    """A gqlm training run as an lm-eval model (module docstring)."""

    def __init__(self, workdir: str | None = None, step: int | None = None, batch_size: int | str | None = 16,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool = False,
                 edit: Callable[[ConfigDict], ConfigDict] | None = None, max_batch_size: Any = None,
                 device: Any = None) -> None:
        super().__init__()
        if not workdir:
            raise ConfigError("the gqlm lm-eval model needs workdir=DIR (a training workdir with checkpoints)")
        if jax.process_count() > 1:
            raise ConfigError("the gqlm lm-eval model runs in one process (any number of local devices)")
        exp, self.step, state = restore_trained(workdir, LMTask(), None if step is None else int(step), edit)
        self.workdir, self.exp, self.params = workdir, exp, state.params
        self.tok = exp.tokenizer
        self.sharding = mesh_lib.batch_sharding(exp.mesh, exp.config.mesh.rules)
        multiple = rows_multiple(self.sharding)
        wanted = int(batch_size) if str(batch_size or "auto").isdigit() else 16  # "auto": the default
        self.rows = -(-max(wanted, 1) // multiple) * multiple
        self._max_length = int(max_length or exp.config.model.max_seq_len)
        self._max_gen_toks, self.add_bos_token = int(max_gen_toks), bool(add_bos_token)
        self.scorer = make_scorer(exp.model.graphdef, exp.config.mesh.rules, exp.shardings.params, self.sharding)
        self.generations = 0  # seeds sampled generation, one key per batch

    # ----------------------------------------------------------------------------- tokens

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.rows

    @property
    def tokenizer_name(self) -> str:
        return self.exp.config.data.tokenizer

    def get_model_info(self) -> dict[str, Any]:
        return {"gqlm_workdir": self.workdir, "gqlm_step": self.step, "tokenizer": self.tokenizer_name}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The run's tokenizer; BOS as lm-eval's `hf` adds it (text already starting with it gets none)."""
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and string.startswith(SPECIAL_TOKENS["bos_token"]):
            add_bos = False
        return ([self.tok.bos_id] if add_bos else []) + self.tok.encode(string)

    def tok_decode(self, ids: Sequence[int]) -> str:
        """Text of ids, special ones dropped; invalid UTF-8 becomes U+FFFD, as HF tokenizers decode."""
        return text_to_bytes(self.tok.decode(ids)).decode("utf-8", "replace")

    # ----------------------------------------------------------------------------- scores

    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """(summed log-prob, is greedy) of each continuation, batched longest first."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results = []
        with jax.set_mesh(self.exp.mesh), tqdm(total=len(requests), disable=disable_tqdm,
                                               desc="gqlm loglikelihood") as bar:
            for chunk in order.get_batched(n=self.rows):
                answers = self._score_batch(chunk)
                for (strings, _, _), answer in zip(chunk, answers):
                    if strings is not None:
                        self.cache_hook.add_partial("loglikelihood", strings, answer)
                results += answers
                bar.update(len(chunk))
        return order.get_original(results)

    def _score_batch(self, chunk: Sequence[TokenRequest]) -> list[tuple[float, bool]]:
        # Like `hf`: the last max_length + 1 tokens of context + continuation, shifted by one.
        rows = [(context + continuation)[-(self.max_length + 1):] for _, context, continuation in chunk]
        for (_, _, continuation), row in zip(chunk, rows):
            if not 0 < len(continuation) < len(row):
                raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the model's window "
                                 f"of {self.max_length} tokens after at least one context token")
        length = padded_length(max(len(r) - 1 for r in rows), self.max_length)
        batch = pack_rows(rows, self.rows, length, self.tok.pad_id)
        logp_BT, greedy_BT = jax.device_get(self.scorer(self.params, to_global(batch, self.sharding)))
        answers = []
        for b, ((_, _, continuation), row) in enumerate(zip(chunk, rows)):
            span = slice(len(row) - 1 - len(continuation), len(row) - 1)
            answers.append((float(np.sum(logp_BT[b, span], dtype=np.float64)), bool(np.all(greedy_BT[b, span]))))
        return answers

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, each token scored once (lm-eval's rolling windows)."""
        windows, owners = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            pairs = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                       max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = np.zeros(len(requests))
        for i, (logp, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logp
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, float(total))
        return [float(t) for t in totals]

    # ----------------------------------------------------------------------------- generation

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Continuations cut at the first `until` string, batched per generation kwargs."""
        order = Collator([r.args for r in requests], sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                         group_by="gen_kwargs", group_fn=lambda a: a[1])
        results = []
        with jax.set_mesh(self.exp.mesh), tqdm(total=len(requests), disable=disable_tqdm,
                                               desc="gqlm generate_until") as bar:
            for chunk in order.get_batched(n=self.rows):
                contexts, all_kwargs = zip(*chunk)
                texts = self._generate_batch(contexts, all_kwargs[0])
                for args, text in zip(chunk, texts):
                    self.cache_hook.add_partial("generate_until", args, text)
                results += texts
                bar.update(len(chunk))
        return order.get_original(results)

    def _generate_batch(self, contexts: Sequence[str], gen_kwargs: dict[str, Any]) -> list[str]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until, num_tokens = kwargs.pop("until", None) or [], kwargs.pop("max_gen_toks")
        until = [until] if isinstance(until, str) else list(until)
        temperature, top_k = sampling_of(kwargs)
        room = self.max_length - num_tokens  # as `hf`: the prompt keeps what the window leaves
        if room < 1:
            raise ValueError(f"max_gen_toks={num_tokens} leaves no room for a prompt in the model's window "
                             f"of {self.max_length} tokens")
        prompts = [(self.tok_encode(c) or [self.prefix_token_id])[-room:] for c in contexts]
        one_token_stops = [ids[0] for ids in map(self.tok.encode, until) if len(ids) == 1]
        key = jax.random.fold_in(jax.random.PRNGKey(0), self.generations)
        self.generations += 1
        tokens_BN = generate(self.exp.model.graphdef, self.params,
                             prompts + [[self.prefix_token_id]] * (self.rows - len(prompts)), key,
                             num_tokens=num_tokens, temperature=temperature, top_k=top_k,
                             stop_ids=(self.tok.eos_id, *one_token_stops), pad_id=self.tok.pad_id,
                             rules=self.exp.config.mesh.rules, vocab_limit=self.tok.vocab_size,
                             prompt_len=padded_length(max(map(len, prompts)), room))
        rows = np.asarray(jax.device_get(tokens_BN)).tolist()[:len(prompts)]
        return [postprocess_generated_text(self.tok_decode(row[:row.index(self.tok.eos_id)] if self.tok.eos_id in row
                                                           else row), until, None) for row in rows]
