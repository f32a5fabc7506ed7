"""GQVAETokenizer: lossless on any text, deterministic, save/load identical, clear errors."""

import json
import os

import jax
import numpy as np
import pytest

from gqlm.config import ConfigError, base_config
from gqlm.tokenizers import load_tokenizer
from gqlm.tokenizers.base import TokenizerDirError, has_surrogates, text_to_bytes
from gqlm.tokenizers.gqvae import tokenizer as tokenizer_module
from gqlm.tokenizers.gqvae.pretokenize import pretokens
from gqlm.tokenizers.gqvae.tokenizer import GQVAETokenizer, build_gqvae_tokenizer
from gqlm.train.tasks.gqvae.checkpoint import CheckpointError, load_checkpoint
from gqlm.train.tasks.gqvae.train import train_gqvae

TEXTS = ["the cat and the hat; the rat sat on the mat. " * 4, "then the man ran to the van.\n" * 4]
VOCAB = 259 + 6


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    c = base_config()
    c.gqvae.update(dict(embed_dim=16, num_heads=2, encoder_layers=1, gater_layers=1, mlp_dim=32,
                        codebook_size=32, max_token_len=4, max_pretoken_len=8, batch_size=32,
                        learning_rate=3e-3, warmup_steps=5, reseed_every=5))
    ckpt = str(tmp_path_factory.mktemp("ckpt"))
    train_gqvae(c, TEXTS, ckpt, 25)
    out = str(tmp_path_factory.mktemp("tok"))
    return ckpt, out, build_gqvae_tokenizer(*load_checkpoint(ckpt), VOCAB, TEXTS, out)


def random_texts(seed, n=30):
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        kind = rng.integers(4)
        if kind == 0:  # arbitrary code points, lone surrogates included
            texts.append("".join(chr(c) for c in rng.integers(0, 0x110000, rng.integers(0, 40))))
        elif kind == 1:  # raw bytes read with surrogateescape
            texts.append(rng.bytes(int(rng.integers(0, 60))).decode("utf-8", "surrogateescape"))
        elif kind == 2:  # mostly the training text, long words past max_pretoken_len
            texts.append(TEXTS[0][: rng.integers(0, 80)] + "supercalifragilistic" * int(rng.integers(3)))
        else:  # ambiguous escapes: surrogates that spell valid UTF-8 together, next to letters
            texts.append("\udcc3\udca9a\udce2 \udc82\ud800x" + chr(int(rng.integers(32, 0x3000))))
    return texts


def test_vocabulary_and_ids(built):
    _, _, tok = built
    assert tok.vocab_size == VOCAB and (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    assert len(tok.tokens) == 6 and len(set(tok.tokens)) == 6 and all(len(t) > 1 for t in tok.tokens)
    sizes = tok.token_bytes()
    assert sizes.shape == (VOCAB,) and (sizes[:256] == 1).all() and (sizes[256:259] == 0).all()
    assert [sizes[259 + i] for i in range(6)] == [len(t) for t in tok.tokens]


def test_round_trip_random_unicode_and_raw_bytes(built):
    _, _, tok = built
    for text in random_texts(0) + TEXTS + [""]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size and i not in (256, 257, 258) for i in ids)
        if not has_surrogates(text):  # then the shared mapping is plain UTF-8
            assert int(tok.token_bytes()[ids].sum()) == len(text_to_bytes(text))


def test_learned_tokens_are_used(built):
    _, _, tok = built
    ids = tok.encode(TEXTS[0])
    assert any(i >= 259 for i in ids) and len(ids) < len(text_to_bytes(TEXTS[0]))


def test_encoding_is_deterministic_and_cache_independent(built):
    ckpt, out, tok = built
    texts = random_texts(1, 10) + TEXTS
    first = [tok.encode(t) for t in texts]
    fresh = GQVAETokenizer.load(out)  # empty run-time cache, other batch composition
    assert fresh.encode_batch(list(reversed(texts))) == list(reversed(first))
    bare = GQVAETokenizer.load(out, table=False)  # every pretoken through the model
    assert [bare.encode(t) for t in reversed(texts)] == list(reversed(first))
    assert [tok.encode(t) for t in texts] == first  # now all cached


def test_save_load_identical(built, tmp_path):
    _, _, tok = built
    tok.save(str(tmp_path))
    loaded = load_tokenizer(f"gqvae:{tmp_path}")
    assert isinstance(loaded, GQVAETokenizer)
    assert loaded.fingerprint() == tok.fingerprint() and loaded.tokens == tok.tokens
    for text in random_texts(2, 10) + TEXTS:
        assert loaded.encode(text) == tok.encode(text)
    np.testing.assert_array_equal(loaded.token_bytes(), tok.token_bytes())


def test_load_errors_name_the_path(built, tmp_path):
    _, out, _ = built
    with pytest.raises(TokenizerDirError, match="does not exist"):
        GQVAETokenizer.load(str(tmp_path / "missing"))
    manifest = json.load(open(os.path.join(out, "gqlm_tokenizer.json")))
    cases = (({"kind": "bpe"}, "not 'gqvae'"), ({"format_version": 7}, "format_version 7"),
             ({"format_version": 1}, "format_version 1"))  # 1: the 512-position buckets' encodings
    for n, (change, message) in enumerate(cases):
        bad = tmp_path / f"bad_{n}"
        bad.mkdir()
        (bad / "gqlm_tokenizer.json").write_text(json.dumps({**manifest, **change}))
        with pytest.raises(TokenizerDirError, match=message) as info:
            GQVAETokenizer.load(str(bad))
        assert str(bad) in str(info.value) and "\n" not in str(info.value)
    nop = tmp_path / "no_params"
    nop.mkdir()
    (nop / "gqlm_tokenizer.json").write_text(json.dumps(manifest))
    with pytest.raises(TokenizerDirError, match="incomplete or corrupt"):
        GQVAETokenizer.load(str(nop))


def test_build_errors(built, tmp_path):
    ckpt, _, _ = built
    with pytest.raises(ConfigError, match="vocab_size=100000 exceeds") as info:
        GQVAETokenizer.build(*load_checkpoint(ckpt), 100_000, TEXTS)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="vocab_size=10 must be at least 259"):
        GQVAETokenizer.build(*load_checkpoint(ckpt), 10, TEXTS)
    with pytest.raises(CheckpointError, match="is not a GQ-VAE checkpoint") as info:
        GQVAETokenizer.build(*load_checkpoint(str(tmp_path)), VOCAB, TEXTS)
    assert str(tmp_path) in str(info.value)


def test_cache_is_bounded(built, monkeypatch):
    ckpt, out, _ = built
    monkeypatch.setattr(tokenizer_module, "MAX_CACHE", 3)
    tok = GQVAETokenizer.load(out)
    text = random_texts(3, 1)[0] + TEXTS[1]
    assert len(tok.table()) > 0 and tok.cached() == 0  # the saved table is not bounded
    assert tok.decode(tok.encode(text)) == text and tok.cached() == 3
    assert tok.encode(text) == GQVAETokenizer.load(out).encode(text)


def test_segments_missing_from_the_vocabulary_use_longest_prefixes(built):
    from gqlm.tokenizers.gqvae.model import make_model, split_params
    _, _, tok = built
    graphdef, params = split_params(make_model(tok.cfg))
    custom = GQVAETokenizer(tok.cfg, params, [b"th", b"the", b"at"])
    th, the, at = 259, 260, 261
    assert custom._spell(b"theat") == [the, at]
    assert custom._spell(b"thxat") == [th, ord("x"), at]
    assert custom._spell(b"xt") == [ord("x"), ord("t")]
    assert custom._spell(b"") == []


def test_build_many_matches_single_builds(built):
    ckpt, _, tok = built
    many = GQVAETokenizer.build_many(*load_checkpoint(ckpt), [VOCAB - 2, VOCAB, 100_000], TEXTS, strict=False)
    assert many[VOCAB].tokens == tok.tokens and many[VOCAB - 2].tokens == tok.tokens[:-2]
    assert isinstance(many[100_000], ConfigError) and "vocab_size=100000" in str(many[100_000])
    with pytest.raises(ConfigError, match="vocab_size=100000"):
        GQVAETokenizer.build_many(*load_checkpoint(ckpt), [VOCAB, 100_000], TEXTS)


def test_saved_table_is_what_the_model_gives(built, tmp_path):
    _, out, tok = built
    assert set(tok.table()) == {p for t in TEXTS for p in pretokens(t)}
    bare = GQVAETokenizer.load(out, table=False)
    assert bare.table() == {} and bare.fingerprint() != tok.fingerprint()
    for text in TEXTS + random_texts(4, 10):
        assert bare.encode(text) == tok.encode(text)
    assert bare.remember(TEXTS) == len(tok.table()) and bare.table() == tok.table()
    bare.save(str(tmp_path))
    assert GQVAETokenizer.load(str(tmp_path)).fingerprint() == tok.fingerprint()


def reference_segments(tok, items):
    """pretoken -> [(segment bytes, code at its last byte)] from model.segment (argmin quantizer)
    on every piece padded to max_pretoken_len in one batch."""
    import jax
    from flax import nnx
    from gqlm.tokenizers.gqvae.model import segment
    from gqlm.tokenizers.gqvae.pretokenize import pack_pieces, split_piece
    from gqlm.tokenizers.gqvae.model import make_model, split_params
    graphdef, _ = split_params(make_model(tok.cfg))
    pieces = [c for p in items for c in split_piece(text_to_bytes(p), tok.cfg.max_pretoken_len)]
    bytes_NT, lengths_N = pack_pieces(pieces, tok.cfg.max_pretoken_len)
    ends_NT, codes_NT = jax.device_get(segment(nnx.merge(graphdef, tok.params), bytes_NT, lengths_N,
                                               tok.cfg.max_token_len))
    expected, n = {}, 0
    for p in items:
        segs = expected[p] = []
        for piece in split_piece(text_to_bytes(p), tok.cfg.max_pretoken_len):
            prev = 0
            for end in np.flatnonzero(ends_NT[n]):
                segs.append((piece[prev:end + 1], int(codes_NT[n, end])))
                prev = end + 1
            n += 1
    return expected


def test_bucketed_segmentation_matches_model_segment(built):
    """The encoder path (pieces bucketed by length, nearest code by blocked argmax) against
    model.segment (argmin quantizer) on every piece padded to max_pretoken_len in one batch."""
    from gqlm.tokenizers.gqvae.pretokenize import split_piece
    _, _, tok = built
    items = sorted({p for t in TEXTS + random_texts(5, 20) for p in pretokens(t)})
    pieces = [c for p in items for c in split_piece(text_to_bytes(p), tok.cfg.max_pretoken_len)]
    assert {len(c) for c in pieces} == set(range(1, tok.cfg.max_pretoken_len + 1))  # every bucket used
    assert tok._segment_pretokens(items) == reference_segments(tok, items)


def test_vocabulary_is_every_distinct_segment_by_frequency(built):
    """The full vocabulary = the distinct multi-byte segments of the build texts, counted per
    occurrence, most frequent first (ties in byte order), against a count done here; a code ends
    several of its strings; one id more than that is refused, naming the value."""
    ckpt, _, tok = built
    occurrences = [p for t in TEXTS for p in pretokens(t)]
    segs = reference_segments(tok, sorted(set(occurrences)))
    freq, codes = {}, {}
    for p in occurrences:
        for seg, code in segs[p]:
            if len(seg) > 1:
                freq[seg] = freq.get(seg, 0) + 1
                codes.setdefault(seg, set()).add(code)
    want = sorted(freq, key=lambda s: (-freq[s], s))
    assert want[:6] == tok.tokens
    full, over = 259 + len(want), 260 + len(want)
    stats = {}
    many = GQVAETokenizer.build_many(*load_checkpoint(ckpt), [full, over], TEXTS, strict=False, stats=stats)
    assert many[full].tokens == want
    strings_of = {}
    for seg in want:
        for code in codes[seg]:
            strings_of.setdefault(code, []).append(seg)
    assert max(map(len, strings_of.values())) >= 2  # one code, several vocabulary strings
    assert (stats["distinct_segments"], stats["codes_ending_them"], stats["strings_per_code_max"]) == \
        (len(want), len(strings_of), max(map(len, strings_of.values())))
    assert isinstance(many[over], ConfigError) and f"vocab_size={over} exceeds" in str(many[over])
    assert f"{len(want)} distinct multi-byte segments" in str(many[over]) and "\n" not in str(many[over])
    assert all(many[full].decode(many[full].encode(t)) == t for t in TEXTS)


def test_fixed_gates_skip_the_model():
    from gqlm.tokenizers.gqvae.model import make_model, split_params
    c = base_config().gqvae
    c.update(dict(embed_dim=8, num_heads=2, encoder_layers=1, gater_layers=1, mlp_dim=16, codebook_size=8,
                  max_token_len=4, max_pretoken_len=4, fixed_gate_every=3))
    graphdef, params = split_params(make_model(c))
    tok = GQVAETokenizer(c, params, [b"abc", b"yz"])
    items = ["abcdefghijk", " x", "\u00e9\u00e9\u00e9\u00e9"]
    for codes in (True, False):
        segs = tok._segment_pretokens(items, codes=codes)
        for p in items:  # pieces of 4 bytes, each cut every 3 bytes
            data = text_to_bytes(p)
            want = [data[i:i + 4][j:j + 3] for i in range(0, len(data), 4) for j in range(0, len(data[i:i + 4]), 3)]
            assert [s for s, _ in segs[p]] == want
            assert all((code == -1) != codes for _, code in segs[p])
    assert tok.encode("abcxyz") == [259, ord("x"), 260]  # pieces "abcx" + "yz": "abc" "x" "yz"


def test_corrupt_table_is_refused(built, tmp_path):
    import shutil
    _, out, tok = built
    arrays = dict(np.load(os.path.join(out, tokenizer_module.TABLE_FILE)))
    ids = arrays["ids"]
    swap = int(np.flatnonzero((ids < 256) & (np.roll(ids, -1) < 256) & (ids != np.roll(ids, -1)))[0])
    same_lengths = ids.copy()
    same_lengths[[swap, swap + 1]] = ids[[swap + 1, swap]]  # same sizes, wrong bytes
    for change in ({"ids": same_lengths}, {"ids": np.full_like(ids, 257)}, {"id_counts": arrays["id_counts"][:-1]}):
        bad = tmp_path / f"bad_{len(os.listdir(tmp_path))}"
        shutil.copytree(out, bad)
        np.savez(bad / tokenizer_module.TABLE_FILE, **{**arrays, **change})
        with pytest.raises(TokenizerDirError, match="pretokens.npz is corrupt") as info:
            GQVAETokenizer.load(str(bad))
        assert str(bad) in str(info.value) and "\n" not in str(info.value)
    assert GQVAETokenizer.load(str(bad), table=False).encode(TEXTS[0]) == tok.encode(TEXTS[0])


def test_table_of_any_text_survives_save_load(built, tmp_path):
    _, out, tok = built
    texts = random_texts(6, 20)  # lone surrogates and raw bytes in the table's keys
    bare = GQVAETokenizer.load(out, table=False)
    bare.remember(texts)
    bare.save(str(tmp_path / "any"))
    loaded = GQVAETokenizer.load(str(tmp_path / "any"))
    assert loaded.table() == bare.table() and any(has_surrogates(p) for p in loaded.table())
    assert [loaded.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    empty = GQVAETokenizer.load(out, table=False)
    empty.save(str(tmp_path / "empty"))
    assert GQVAETokenizer.load(str(tmp_path / "empty")).table() == {}


def test_pretoken_store_gathers_truncates_and_refills():
    from gqlm.tokenizers.gqvae.pretoken_store import PretokenIds
    rng = np.random.default_rng(7)
    entries = {f"p{i}": rng.integers(0, 300, rng.integers(1, 5)).tolist() for i in range(3000)}
    items = list(entries.items())
    store = PretokenIds()
    store.add(dict(items[:1000]))
    store.add(dict(items[1000:]))  # past the initial capacity: the arrays grow
    keys = [f"p{i}" for i in rng.integers(0, 3000, 500)]
    slots = store.lookup(keys + ["absent"])
    assert slots[-1] == -1 and store.gather(slots[:0]) == []
    assert store.gather(slots[:-1]) == [i for k in keys for i in entries[k]]
    store.truncate(1000)
    assert len(store) == 1000 and store.lookup(["p999", "p1000"]).tolist() == [999, -1]
    store.add({"p1000": [5, 6]})
    assert store.gather(store.lookup(["p1000", "p0"])) == [5, 6] + entries["p0"]
    assert store.as_dict() == {**dict(items[:1000]), "p1000": [5, 6]}


def test_cut_or_foreign_files_are_one_line_errors(built, tmp_path):
    import shutil
    _, out, tok = built
    manifest = json.load(open(os.path.join(out, "gqlm_tokenizer.json")))
    params = dict(np.load(os.path.join(out, tokenizer_module.PARAMS_FILE)))
    first = sorted(params)[0]

    def broken(name, files):
        bad = tmp_path / name
        shutil.copytree(out, bad)
        for file, data in files.items():
            (bad / file).write_bytes(data)
        return str(bad)

    files = (tokenizer_module.PARAMS_FILE, tokenizer_module.TABLE_FILE)
    cut = {f: open(os.path.join(out, f), "rb").read() for f in files}
    int8 = tmp_path / "int8.npz"
    np.savez(int8, **{**params, first: params[first].astype(np.int8)})
    cases = [  # a file cut short raised zipfile.BadZipFile; a foreign section AttributeError
        (broken("cut_params", {tokenizer_module.PARAMS_FILE: cut[tokenizer_module.PARAMS_FILE][:500]}), "corrupt"),
        (broken("cut_table", {tokenizer_module.TABLE_FILE: cut[tokenizer_module.TABLE_FILE][:300]}),
         "pretokens.npz is corrupt"),
        (broken("list_section", {"gqlm_tokenizer.json": json.dumps({**manifest, "gqvae": [1]}).encode()}),
         "not a mapping"),
        (broken("int8_params", {tokenizer_module.PARAMS_FILE: int8.read_bytes()}), f"{first!r} of shape"),
    ]
    for path, message in cases:
        with pytest.raises(TokenizerDirError, match=message) as info:
            GQVAETokenizer.load(path)
        assert path in str(info.value) and "\n" not in str(info.value)


def test_a_save_cut_short_never_loads_as_a_mix(built, tmp_path, monkeypatch):
    _, _, tok = built
    other = GQVAETokenizer(tok.cfg, jax.tree.map(lambda x: np.asarray(x) + 1.0, tok.params), tok.tokens[:2])
    target = str(tmp_path / "tok")
    other.save(target)
    real_savez = np.savez

    def savez_then_die(file, **arrays):
        if "ids" in arrays:  # the table: the parameters are already written
            raise KeyboardInterrupt
        real_savez(file, **arrays)

    monkeypatch.setattr(np, "savez", savez_then_die)
    with pytest.raises(KeyboardInterrupt):
        tok.save(target)
    monkeypatch.setattr(np, "savez", real_savez)
    # Manifest-first saving left the new manifest over the old table (or parameters), which loaded.
    with pytest.raises(TokenizerDirError, match="no readable gqlm_tokenizer.json"):
        GQVAETokenizer.load(target)
    tok.save(target)  # a complete save over the remains loads as `tok`
    assert GQVAETokenizer.load(target).fingerprint() == tok.fingerprint()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match="is an existing file"):
        tok.save(str(tmp_path / "a_file"))
    assert (tmp_path / "a_file").read_text() == "x"
