"""GQVAETokenizer: segments text with a trained GQ-VAE's gate; lossless byte fallback.

Ids: 0..255 the bytes, 256 bos, 257 eos, 258 pad, then the learned tokens (multi-byte strings).
`encode` cuts each text into GPT-2 pretokens; each pretoken's ids come from a store
(`PretokenIds`: one dict lookup per pretoken, then one NumPy gather for the whole text) that starts
as the table of the training text's pretokens saved with the tokenizer (`pretokens.npz`). Only the
distinct misses run the model: each is cut into pieces of at most `max_pretoken_len` bytes, which a
`PieceRunner` groups by length (`BUCKETS`: every length up to 16, so little padding is computed)
into batches of one fixed shape per length, so a piece's result does not depend on what else is
encoded. Batches are dispatched from a worker thread as they fill, while the next texts are
pretokenized (the regex releases the GIL), and spread over the CPU devices, one per core at most.
The encoder + quantizer + gater cut each piece where the gate exceeds 0.5 (and at most every
`max_token_len` bytes); encoding fetches the cuts alone (codes are only the gater's input), and
with fixed gates (the VQ-VAE baseline) computes them without the model. A segment in the
vocabulary is one id; any other segment is spelled with the longest vocabulary strings that
prefix what is left of it, else single bytes, so every text round-trips.
Cost: the model on the unseen pretokens, compute-bound on CPU: ~1 MFLOP per byte position for
4,096 codes, half of it the nearest-code search (2 x embed_dim x codebook_size FLOPs).

The vocabulary (`build`): the model segments every pretoken of `texts` (gate + codebook: the gater
reads the quantized vectors); every distinct multi-byte segment is a candidate, counted once per
occurrence in `texts`, and the most frequent fill the learned ids (ties: byte order). A code may
thus own several strings (the segments it ends): one string per code capped a 16k-code model at
~5.6k strings, while its segments give many more, so the vocabulary size is bounded by the distinct
segments the model produces, not by the codes in use. The table holds the ids of the `MAX_TABLE`
most frequent pretokens of `texts`, computed by the same model code.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
import zipfile
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gqlm.config import ConfigDict, ConfigError
from gqlm.config import gqvae as gqvae_config
from gqlm.files import atomic_path
from gqlm.tokenizers.base import (MANIFEST, TokenizerDirError, bytes_to_text, fingerprint_of, has_surrogates,
                                  read_manifest, text_to_bytes, write_manifest)
from gqlm.tokenizers.gqvae.model import abstract_model
from gqlm.tokenizers.gqvae.piece_runner import PieceRunner, rows_for
from gqlm.tokenizers.gqvae.pretoken_store import PretokenIds
from gqlm.tokenizers.gqvae.pretokenize import pack_pieces, pretokens, split_piece
from gqlm.tokenizers.gqvae.segmenter import fixed_cuts, jitted_segmenter, model_devices

KIND = "gqvae"
FORMAT_VERSION = 2  # 2: exact-length buckets (piece_runner; 1's 512-position buckets could round differently)
PARAMS_FILE = "params.npz"
TABLE_FILE = "pretokens.npz"  # optional: directories without it encode the same, only slower
NUM_SPECIAL = 3
FIRST_LEARNED = 256 + NUM_SPECIAL
BUCKETS = tuple(range(1, 17)) + (24, 32, 48, 64)  # padded piece lengths (+ max_pretoken_len)
MAX_CACHE = 1_000_000  # pretokens remembered at run time, beyond the saved table
MAX_TABLE = 200_000  # most frequent pretokens of the build texts whose ids are saved
ENCODING = "exact-bucketed-gate-segments+longest-prefix-fallback"  # in the fingerprint: cached token streams follow it


def buckets_for(max_len: int) -> tuple[int, ...]:
    """The padded lengths pieces of at most `max_len` bytes are run at."""
    return tuple(b for b in BUCKETS if b < max_len) + (max_len,)


class GQVAETokenizer:
    kind = KIND
    bos_id, eos_id, pad_id = 256, 257, 258

    def __init__(self, cfg: ConfigDict, params: Any, tokens: Sequence[bytes]):
        """`cfg`: the model's `gqvae` config section; `params`: its parameters (pure dict)."""
        self.cfg = cfg
        graphdef, _ = abstract_model(cfg)
        self.params = jax.tree.map(jnp.asarray, params)
        self.tokens = list(tokens)
        self.vocab_size = FIRST_LEARNED + len(self.tokens)
        self._id_bytes = [bytes([b]) for b in range(256)] + [b""] * NUM_SPECIAL + self.tokens
        self._token_to_id = {t: FIRST_LEARNED + i for i, t in enumerate(self.tokens)}
        self._longest = max(map(len, self.tokens), default=1)
        # pretoken -> ids: the first `_n_table` slots are the table saved with the tokenizer, then
        # what encoding met since (MAX_CACHE more at most).
        self._store = PretokenIds()
        self._n_table = 0
        self._buckets = buckets_for(cfg.max_pretoken_len)
        self._bucket_of = [next(b for b in self._buckets if b >= n) for n in range(cfg.max_pretoken_len + 1)]
        every = cfg.fixed_gate_every
        self._segment = jitted_segmenter(graphdef, cfg.max_token_len, every, False)
        # Cuts alone: with fixed gates they do not depend on the model (XLA drops the unused encoder).
        self._ends = jitted_segmenter(graphdef, cfg.max_token_len, every, True)
        self._params_per_device: list[Any] | None = None  # placed on first use
        self._base_fingerprint = (KIND, str(FORMAT_VERSION), ENCODING, repr(sorted(cfg.to_dict().items())),
                                  b"\0".join(self.tokens), _params_digest(self.params))
        self._fingerprint = ""

    # ------------------------------------------------------------------------- building

    @classmethod
    def build(cls, cfg: ConfigDict, params: Any, vocab_size: int, texts: Iterable[str]) -> "GQVAETokenizer":
        """Vocabulary of `vocab_size` ids for a trained model (`gqvae` section, params), segmenting `texts`."""
        return cls.build_many(cfg, params, [vocab_size], texts)[vocab_size]

    @classmethod
    def build_many(cls, cfg: ConfigDict, params: Any, vocab_sizes: Sequence[int], texts: Iterable[str],
                   strict: bool = True, stats: dict[str, Any] | None = None) -> dict[int, Any]:
        """One tokenizer per size from one segmentation of `texts` (the ranking does not depend on
        the size). A size exceeding 259 + the distinct multi-byte segments of `texts` raises
        ConfigError naming it, or with `strict=False` maps to that (unraised) error. Each keeps the
        table of `texts`' pretokens. `stats`, if given, receives the segmentation's counts."""
        for v in vocab_sizes:
            if v < FIRST_LEARNED:
                raise ConfigError(f"vocab_size={v} must be at least {FIRST_LEARNED} (256 bytes + 3 specials)")
        counts = _pretoken_counts(texts)
        segmented = cls(cfg, params, [])._segment_pretokens(list(counts))
        ranked = _ranked_segment_strings(segmented, counts)
        if stats is not None:
            strings_of: dict[int, set[bytes]] = collections.defaultdict(set)
            for segments in segmented.values():
                for seg, code in segments:
                    if len(seg) > 1:
                        strings_of[code].add(seg)
            per_code = sorted(map(len, strings_of.values()))
            stats.update(distinct_segments=len(ranked), codes_ending_them=len(per_code),
                         strings_per_code_median=per_code[len(per_code) // 2] if per_code else 0,
                         strings_per_code_max=per_code[-1] if per_code else 0)
        frequent = [p for p, _ in counts.most_common(MAX_TABLE)]
        out: dict[int, Any] = {}
        for v in vocab_sizes:
            if v - FIRST_LEARNED > len(ranked):
                out[v] = ConfigError(
                    f"vocab_size={v} exceeds what the checkpoint's segmentation gives on these texts: "
                    f"{FIRST_LEARNED} byte/special ids + {len(ranked)} distinct multi-byte segments = "
                    f"{FIRST_LEARNED + len(ranked)}")
                if strict:
                    raise out[v]
            else:
                tok = out[v] = cls(cfg, params, ranked[:v - FIRST_LEARNED])
                tok._extend_table({p: tok._ids(segmented[p]) for p in frequent})
        return out

    def remember(self, texts: Iterable[str]) -> int:
        """Adds the most frequent pretokens of `texts` to the saved table (up to MAX_TABLE in all),
        e.g. for a directory built before tables existed; encodings do not change. Returns its size."""
        self._store.truncate(self._n_table)
        new = [p for p, _ in _pretoken_counts(texts).most_common() if p not in self._store.slot]
        self._extend_table(self._model_ids(new[:max(0, MAX_TABLE - self._n_table)]))
        return self._n_table

    def _extend_table(self, entries: dict[str, list[int]]) -> None:
        self._store.truncate(self._n_table)  # the run-time cache goes: table slots come first
        self._store.add({p: v for p, v in entries.items() if p not in self._store.slot})
        self._n_table = len(self._store)
        self._fingerprint = ""

    def table(self) -> dict[str, list[int]]:
        """The saved pretoken table: pretoken -> ids."""
        return self._store.as_dict(self._n_table)

    def cached(self) -> int:
        """Pretokens known beyond the table (the run-time cache)."""
        return len(self._store) - self._n_table

    def _segment_pretokens(self, items: Sequence[str], codes: bool = True) -> dict[str, list[tuple[bytes, int]]]:
        """Each pretoken -> its segments (byte string, code at the segment's last byte; -1 with
        `codes=False`: the cuts alone are fetched, and with fixed gates the model is skipped)."""
        with self._runner(codes) as runner:
            owned = [(p, self._queue(runner, p)) for p in items]
            return self._collect(owned, runner.results())

    def _queue(self, runner: PieceRunner, pretoken: str) -> list[tuple[bytes, int]]:
        """Queues the pieces of `pretoken`; returns (piece, runner index) for each."""
        return [(c, runner.add(c)) for c in split_piece(text_to_bytes(pretoken), self.cfg.max_pretoken_len)]

    def _collect(self, owned: list[tuple[str, list[tuple[bytes, int]]]],
                 results: list[tuple[list[int], list[int]]]) -> dict[str, list[tuple[bytes, int]]]:
        """pretoken -> segments, from its (piece, runner index) pairs and the runner's results."""
        out: dict[str, list[tuple[bytes, int]]] = {}
        for p, pieces in owned:
            segs = out[p] = []
            for piece, index in pieces:
                prev = 0
                for end, code in zip(*results[index]):
                    segs.append((piece[prev:end + 1], code))
                    prev = end + 1
        return out

    def _runner(self, codes: bool) -> PieceRunner:
        """Codes only come with the cuts when asked for: encoding needs the cuts alone, and with
        fixed gates those need no model (NumPy, exactly `hard_boundaries` of `fixed_gates`)."""
        if not codes and self.cfg.fixed_gate_every:
            return PieceRunner(functools.partial(fixed_cuts, every=self.cfg.fixed_gate_every), [None],
                               self._bucket_of, with_codes=False, threaded=False)
        if self._params_per_device is None:
            self._params_per_device = [jax.device_put(self.params, d) for d in model_devices()]
        return PieceRunner(self._segment if codes else self._ends, self._params_per_device, self._bucket_of,
                           with_codes=codes)

    def precompile(self) -> None:
        """Compiles encoding's batch shapes on each of the model's devices now (its first calls
        would otherwise); fixed gates compile nothing."""
        if self.cfg.fixed_gate_every:
            return
        self._runner(False)  # places the parameters
        for params in self._params_per_device:
            for length in self._buckets:
                bytes_RT, lengths_R = pack_pieces([], length, rows_for(length))
                jax.block_until_ready(self._ends(params, bytes_RT, lengths_R))

    # ------------------------------------------------------------------------- encoding

    def _ids(self, segments: Iterable[tuple[bytes, int]]) -> list[int]:
        lookup, ids = self._token_to_id.get, []
        for seg, _ in segments:
            tid = lookup(seg)
            if tid is None:
                ids.extend(self._spell(seg))
            else:
                ids.append(tid)
        return ids

    def _model_ids(self, items: Sequence[str]) -> dict[str, list[int]]:
        """Ids of `items` computed by the model (no store involved)."""
        return {p: self._ids(segs) for p, segs in self._segment_pretokens(list(items), codes=False).items()}

    def _spell(self, seg: bytes) -> list[int]:
        """A segment the vocabulary lacks: greedy longest vocabulary prefixes, else single bytes."""
        lookup, ids, i = self._token_to_id.get, [], 0
        while i < len(seg):
            for j in range(min(len(seg), i + self._longest), i + 1, -1):
                tid = lookup(seg[i:j])
                if tid is not None:
                    ids.append(tid)
                    i = j
                    break
            else:
                ids.append(seg[i])
                i += 1
        return ids

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Pretokens missing from the store are queued for the model as each text is
        pretokenized, so the model runs while the next texts are; their ids join the store in
        sorted order (the same cache whatever the texts' order)."""
        store, texts_slots, queued = self._store, [], {}
        with self._runner(False) as runner:
            for text in texts:
                pts = pretokens(text)
                slots = store.lookup(pts)
                where = np.flatnonzero(slots < 0).tolist()
                for i in where:
                    if pts[i] not in queued:
                        queued[pts[i]] = self._queue(runner, pts[i])
                texts_slots.append((pts, slots, where))
            segments = self._collect(sorted(queued.items()), runner.results()) if queued else {}
        if segments:
            before = len(store)
            store.add({p: self._ids(segs) for p, segs in segments.items()})
            for pts, slots, where in texts_slots:
                slots[where] = [store.slot[pts[i]] for i in where]
        out = [self._checked(t, store.gather(slots)) for t, (_, slots, _) in zip(texts, texts_slots)]
        if segments and len(store) - self._n_table > MAX_CACHE:  # Bounded: keep what fits, in sorted order.
            store.truncate(max(before, self._n_table + MAX_CACHE))
        return out

    def _checked(self, text: str, ids: list[int]) -> list[int]:
        # Lone surrogates are the one case where per-pretoken bytes could decode differently from
        # the whole text's; verify, and spell the text out in bytes if so (not seen in 9,000 random texts).
        if has_surrogates(text) and self.decode(ids) != text:
            return list(text_to_bytes(text))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Special and out-of-range ids are dropped; any id sequence decodes."""
        table, n = self._id_bytes, self.vocab_size
        return bytes_to_text(b"".join(table[i] for i in map(int, ids) if 0 <= i < n))

    def token_bytes(self) -> np.ndarray:
        return np.array([len(b) for b in self._id_bytes], np.int32)

    def fingerprint(self) -> str:
        if not self._fingerprint:  # The table decides its pretokens' ids, so it is part of the identity.
            table = self._store.arrays(self._n_table)
            self._fingerprint = fingerprint_of(*self._base_fingerprint, *(table[k].tobytes() for k in sorted(table)))
        return self._fingerprint

    # ------------------------------------------------------------------------- save / load

    def save(self, path: str) -> None:
        """The data files first, each written whole then renamed, and the manifest last: a save cut
        short leaves a directory that refuses to load, never a manifest over another save's files."""
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"gqvae tokenizer directory {path!r} is an existing file, not a directory")
        os.makedirs(path, exist_ok=True)
        if os.path.exists(os.path.join(path, MANIFEST)):
            os.remove(os.path.join(path, MANIFEST))
        flat = {jax.tree_util.keystr(path_, simple=True, separator="/"): np.asarray(v)
                for path_, v in jax.tree_util.tree_flatten_with_path(self.params)[0]}
        _write_npz(os.path.join(path, PARAMS_FILE), flat)
        _write_npz(os.path.join(path, TABLE_FILE), self._store.arrays(self._n_table))
        write_manifest(path, KIND, FORMAT_VERSION, vocab_size=self.vocab_size, bos_id=self.bos_id,
                       eos_id=self.eos_id, pad_id=self.pad_id, tokens=[t.hex() for t in self.tokens],
                       gqvae=self.cfg.to_dict())

    @classmethod
    def load(cls, path: str, table: bool = True) -> "GQVAETokenizer":
        """`table=False` ignores the saved pretoken table (encodings are the same, only slower)."""
        manifest = read_manifest(path, KIND, FORMAT_VERSION)
        where = f"gqvae tokenizer directory {path!r}"
        try:
            cfg = gqvae_config.from_dict(manifest["gqvae"], path)
            tokens = [bytes.fromhex(t) for t in manifest["tokens"]]
            with np.load(os.path.join(path, PARAMS_FILE)) as npz:
                arrays = dict(npz)
        except (KeyError, TypeError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # a cut file: BadZipFile
            raise TokenizerDirError(f"{where} is incomplete or corrupt ({type(e).__name__}: {e})") from None
        _, abstract = abstract_model(cfg)

        def restore(path_, leaf):
            key = jax.tree_util.keystr(path_, simple=True, separator="/")
            if key not in arrays or arrays[key].shape != leaf.shape or arrays[key].dtype != leaf.dtype:
                raise TokenizerDirError(f"{where}: {PARAMS_FILE} lacks parameter {key!r} of shape {leaf.shape} "
                                        f"and dtype {leaf.dtype}")
            return arrays[key]

        params = jax.tree_util.tree_map_with_path(restore, abstract)
        tok = cls(cfg, params, tokens)
        if tok.vocab_size != manifest.get("vocab_size"):
            raise TokenizerDirError(f"{where}: manifest vocab_size {manifest.get('vocab_size')!r} "
                                    f"does not match its {len(tokens)} tokens")
        table_file = os.path.join(path, TABLE_FILE)
        if table and os.path.exists(table_file):
            try:
                with np.load(table_file) as npz:
                    tok._store.add_arrays(dict(npz), tok._id_bytes, FIRST_LEARNED)
                tok._n_table = len(tok._store)
            except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                raise TokenizerDirError(f"{where}: {TABLE_FILE} is corrupt ({type(e).__name__}: {e})") from None
        return tok


def _write_npz(file: str, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(file) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to tmp
        np.savez(f, **arrays)


def _pretoken_counts(texts: Iterable[str]) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for text in texts:
        counts.update(pretokens(text))
    return counts


def _ranked_segment_strings(segmented: dict[str, list[tuple[bytes, int]]],
                            counts: collections.Counter) -> list[bytes]:
    """The distinct multi-byte segments, most frequent first (occurrences weighted by pretoken
    counts; ties in byte order). Whichever codes end a string, its occurrences add up."""
    strings: collections.Counter = collections.Counter()
    for pretoken, segments in segmented.items():
        n = counts[pretoken]
        for seg, _ in segments:
            if len(seg) > 1:
                strings[seg] += n
    return sorted(strings, key=lambda s: (-strings[s], s))


def _params_digest(params: Any) -> bytes:
    h = hashlib.sha256()
    for path_, v in jax.tree_util.tree_flatten_with_path(params)[0]:
        h.update(jax.tree_util.keystr(path_).encode())
        h.update(np.asarray(v).tobytes())
    return h.digest()


def build_gqvae_tokenizer(cfg: ConfigDict, params: Any, vocab_size: int, texts: Iterable[str],
                          out_dir: str) -> GQVAETokenizer:
    """Builds the vocabulary of a trained model on `texts` and saves the tokenizer to `out_dir`."""
    tok = GQVAETokenizer.build(cfg, params, vocab_size, texts)
    tok.save(out_dir)
    return tok
