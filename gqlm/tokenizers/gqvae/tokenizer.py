"""GQVAETokenizer: segments text with a trained GQ-VAE's gate; lossless byte fallback.

Ids: 0..255 the bytes, 256 bos, 257 eos, 258 pad, then the learned tokens (multi-byte strings).
`encode` cuts the text into GPT-2 pretokens, each into pieces of at most `max_pretoken_len` bytes,
runs the encoder + quantizer + gater over the pieces (batched, jitted) and cuts each piece where
the gate exceeds 0.5 (and at most every `max_token_len` bytes). A segment in the vocabulary is one
id; any other segment is spelled with the longest vocabulary strings that prefix what is left of
it, else single bytes, so every text round-trips. Results are cached
per pretoken.

The vocabulary (`build`): for each code, the byte string it most often ends on `texts`; the codes'
strings, ranked by how often they occur, fill the learned ids.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import os
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gqlm.config import ConfigDict, ConfigError
from gqlm.tokenizers.base import (TokenizerDirError, bytes_to_text, fingerprint_of, has_surrogates,
                                  read_manifest, text_to_bytes, write_manifest)
from gqlm.tokenizers.gqvae.model import segment
from gqlm.tokenizers.gqvae.pretokenize import pack_pieces, pretokens, split_piece
from gqlm.tokenizers.gqvae.train import config_from_dict, load_checkpoint, make_model, split_params

KIND = "gqvae"
FORMAT_VERSION = 1
PARAMS_FILE = "params.npz"
NUM_SPECIAL = 3
FIRST_LEARNED = 256 + NUM_SPECIAL
ROWS = 256  # pieces per model call; one fixed shape, so one compile and batch-independent results
MAX_CACHE = 1_000_000  # pretokens remembered
ENCODING = "gate-segments+longest-prefix-fallback"  # in the fingerprint: cached token streams follow it


class GQVAETokenizer:
    kind = KIND
    bos_id, eos_id, pad_id = 256, 257, 258

    def __init__(self, cfg: ConfigDict, graphdef: nnx.GraphDef, params: Any, tokens: Sequence[bytes]):
        self.cfg = cfg
        self.params = jax.tree.map(jnp.asarray, params)
        self.tokens = list(tokens)
        self.vocab_size = FIRST_LEARNED + len(self.tokens)
        self._id_bytes = [bytes([b]) for b in range(256)] + [b""] * NUM_SPECIAL + self.tokens
        self._token_to_id = {t: FIRST_LEARNED + i for i, t in enumerate(self.tokens)}
        self._longest = max(map(len, self.tokens), default=1)
        self._cache: dict[str, list[int]] = {}
        m, every = cfg.max_token_len, cfg.fixed_gate_every
        self._segment = jax.jit(lambda p, b, n: segment(nnx.merge(graphdef, p), b, n, m, every))
        self._fingerprint = fingerprint_of(KIND, str(FORMAT_VERSION), ENCODING, repr(sorted(cfg.to_dict().items())),
                                           b"\0".join(self.tokens), _params_digest(self.params))

    # ------------------------------------------------------------------------- building

    @classmethod
    def build(cls, checkpoint_dir: str, vocab_size: int, texts: Iterable[str]) -> "GQVAETokenizer":
        """Vocabulary of `vocab_size` ids from a `train_gqvae` checkpoint, segmenting `texts`."""
        return cls.build_many(checkpoint_dir, [vocab_size], texts)[vocab_size]

    @classmethod
    def build_many(cls, checkpoint_dir: str, vocab_sizes: Sequence[int], texts: Iterable[str],
                   strict: bool = True) -> dict[int, Any]:
        """One tokenizer per size from one segmentation of `texts` (the ranking does not depend on
        the size). A size exceeding the codes in use raises ConfigError naming it, or with
        `strict=False` maps to that (unraised) error."""
        cfg, graphdef, params = load_checkpoint(checkpoint_dir)
        for v in vocab_sizes:
            if v < FIRST_LEARNED:
                raise ConfigError(f"vocab_size={v} must be at least {FIRST_LEARNED} (256 bytes + 3 specials)")
        ranked = cls(cfg, graphdef, params, [])._ranked_code_strings(texts)
        out: dict[int, Any] = {}
        for v in vocab_sizes:
            if v - FIRST_LEARNED > len(ranked):
                out[v] = ConfigError(
                    f"vocab_size={v} exceeds what the checkpoint's codes give on these texts: "
                    f"{FIRST_LEARNED} byte/special ids + {len(ranked)} multi-byte code strings = "
                    f"{FIRST_LEARNED + len(ranked)}")
                if strict:
                    raise out[v]
            else:
                out[v] = cls(cfg, graphdef, params, ranked[:v - FIRST_LEARNED])
        return out

    def _ranked_code_strings(self, texts: Iterable[str]) -> list[bytes]:
        """For each code, the byte string it most often ends on `texts`; the multi-byte ones,
        ranked by how often they occur."""
        counts = collections.Counter()
        for text in texts:
            counts.update(pretokens(text))
        pair_counts: collections.Counter = collections.Counter()
        for pretoken, segments in self._segment_pretokens(list(counts)).items():
            for seg, code in segments:
                pair_counts[code, seg] += counts[pretoken]
        best: dict[int, tuple[int, bytes]] = {}  # code -> (count, its most frequent string)
        for (code, seg), n in pair_counts.items():
            if (n, seg) > best.get(code, (0, b"")):
                best[code] = (n, seg)
        strings: dict[bytes, int] = {}
        for n, seg in best.values():
            if len(seg) > 1:
                strings[seg] = max(n, strings.get(seg, 0))
        return sorted(strings, key=lambda s: (-strings[s], s))

    def _segment_pretokens(self, items: Sequence[str]) -> dict[str, list[tuple[bytes, int]]]:
        """Each pretoken -> its segments (byte string, code at the segment's last byte)."""
        owners, chunks = [], []
        for i, p in enumerate(items):
            for c in split_piece(text_to_bytes(p), self.cfg.max_pretoken_len):
                owners.append(i)
                chunks.append(c)
        out: dict[str, list[tuple[bytes, int]]] = {p: [] for p in items}
        for start in range(0, len(chunks), ROWS):
            batch = chunks[start:start + ROWS]
            batch = batch + [b"\0"] * (ROWS - len(batch))
            bytes_RT, lengths_R = pack_pieces(batch, self.cfg.max_pretoken_len)
            ends_RT, codes_RT = jax.device_get(self._segment(self.params, bytes_RT, lengths_R))
            for r in range(min(ROWS, len(chunks) - start)):
                piece = chunks[start + r]
                segs = out[items[owners[start + r]]]
                prev = 0
                for end in np.flatnonzero(ends_RT[r]).tolist():
                    segs.append((piece[prev:end + 1], int(codes_RT[r, end])))
                    prev = end + 1
        return out

    # ------------------------------------------------------------------------- encoding

    def _fill(self, items: Iterable[str]) -> dict[str, list[int]]:
        """Ids of uncached pretokens; remembered while the cache has room."""
        found: dict[str, list[int]] = {}
        lookup = self._token_to_id.get
        for p, segments in self._segment_pretokens(list(items)).items():
            ids: list[int] = []
            for seg, _ in segments:
                tid = lookup(seg)
                if tid is None:
                    ids.extend(self._spell(seg))
                else:
                    ids.append(tid)
            found[p] = ids
        room = MAX_CACHE - len(self._cache)
        if room > 0:
            self._cache.update(found if len(found) <= room else dict(list(found.items())[:room]))
        return found

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
        pts = pretokens(text)
        try:  # Fast path: every pretoken cached.
            out = list(itertools.chain.from_iterable(map(self._cache.__getitem__, pts)))
        except KeyError:
            return self._encode_slow(text, pts, self._fill(set(pts) - self._cache.keys()))
        return self._checked(text, out)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        pts_list = [pretokens(t) for t in texts]
        missing = set().union(*pts_list) - self._cache.keys() if pts_list else set()
        found = self._fill(missing) if missing else {}
        return [self._encode_slow(t, pts, found) for t, pts in zip(texts, pts_list)]

    def _encode_slow(self, text: str, pts: list[str], found: dict[str, list[int]]) -> list[int]:
        get = self._cache.get
        out: list[int] = []
        for p in pts:
            ids = get(p)
            out += found[p] if ids is None else ids
        return self._checked(text, out)

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
        return self._fingerprint

    # ------------------------------------------------------------------------- save / load

    def save(self, path: str) -> None:
        write_manifest(path, KIND, FORMAT_VERSION, vocab_size=self.vocab_size, bos_id=self.bos_id,
                       eos_id=self.eos_id, pad_id=self.pad_id, tokens=[t.hex() for t in self.tokens],
                       gqvae=self.cfg.to_dict())
        flat = {"/".join(str(getattr(k, "key", k)) for k in path_): np.asarray(v)
                for path_, v in jax.tree_util.tree_flatten_with_path(self.params)[0]}
        np.savez(os.path.join(path, PARAMS_FILE), **flat)

    @classmethod
    def load(cls, path: str) -> "GQVAETokenizer":
        manifest = read_manifest(path, KIND, FORMAT_VERSION)
        where = f"gqvae tokenizer directory {path!r}"
        try:
            cfg = config_from_dict(manifest["gqvae"], path)
            tokens = [bytes.fromhex(t) for t in manifest["tokens"]]
            with np.load(os.path.join(path, PARAMS_FILE)) as npz:
                arrays = dict(npz)
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise TokenizerDirError(f"{where} is incomplete or corrupt ({type(e).__name__}: {e})") from None
        graphdef, abstract = split_params(nnx.eval_shape(lambda: make_model(cfg)))

        def restore(path_, leaf):
            key = "/".join(str(getattr(k, "key", k)) for k in path_)
            if key not in arrays or arrays[key].shape != leaf.shape:
                raise TokenizerDirError(f"{where}: {PARAMS_FILE} lacks parameter {key!r} of shape {leaf.shape}")
            return arrays[key]

        params = jax.tree_util.tree_map_with_path(restore, abstract)
        tok = cls(cfg, graphdef, params, tokens)
        if tok.vocab_size != manifest.get("vocab_size"):
            raise TokenizerDirError(f"{where}: manifest vocab_size {manifest.get('vocab_size')!r} "
                                    f"does not match its {len(tokens)} tokens")
        return tok


def _params_digest(params: Any) -> bytes:
    h = hashlib.sha256()
    for path_, v in jax.tree_util.tree_flatten_with_path(params)[0]:
        h.update(jax.tree_util.keystr(path_).encode())
        h.update(np.asarray(v).tobytes())
    return h.digest()


def build_gqvae_tokenizer(checkpoint_dir: str, vocab_size: int, texts: Iterable[str],
                          out_dir: str) -> GQVAETokenizer:
    """`python -m gqlm.tokenize --kind gqvae --checkpoint DIR --vocab_size N --out DIR` entry:
    builds the vocabulary on `texts` and saves the tokenizer to `out_dir`."""
    tok = GQVAETokenizer.build(checkpoint_dir, vocab_size, texts)
    tok.save(out_dir)
    return tok
