"""Tokenizers: lossless on any str (lone surrogates included), save/load, token_bytes, errors."""

import json
import os
import random

import numpy as np
import pytest

from gqlm.config import ConfigError
from gqlm.tokenizers import load_tokenizer
from gqlm.tokenizers.base import MANIFEST, bytes_to_text, text_to_bytes
from gqlm.tokenizers.bpe import BPETokenizer, train_bpe
from gqlm.tokenizers.byte import ByteTokenizer

ADVERSARIAL = [
    "", "a", "héllo wörld", "\udcc3\udca9", "é\udcc3\udca9é", "\udcff", "\udcff\udc80\udc80",
    "\ud800", "\udfff", "\ud83d\ude00", "😀\ud83d", "\udced\udca0\udc80", "\udcf0\udc9f\udc98",
    "x\udc80", "\udc7f", "<|bos|> <|eos|>", "\x00\x7f\r\n\t", "a\u0301\u0302 e\u20dd",
    "\udcff\udc80\udc80\udcc3", "\ufeff\uffff\U0010ffff", "\ud800\udc00\udbff\udfff",
]


def random_unicode(rng: random.Random, n: int) -> str:
    """Astral chars, combining marks, lone surrogates (of every kind), ASCII and controls."""
    pools = [(0x20, 0x7E), (0x0, 0x1F), (0x300, 0x36F), (0x80, 0x7FF), (0x800, 0xFFFF),
             (0xD800, 0xDFFF), (0xDC80, 0xDCFF), (0x10000, 0x10FFFF), (0x1F600, 0x1F64F)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def random_raw_text(rng: random.Random, n: int) -> str:
    return bytes(rng.randrange(256) for _ in range(n)).decode("utf-8", "surrogateescape")


def corpus_texts() -> list[str]:
    rng = random.Random(0)
    words = ["the", "king", "queen", "hamlet", "to", "be", "or", "not", "é", "naïve", "😀", "\n"]
    return [" ".join(rng.choice(words) for _ in range(400)) for _ in range(20)] + [random_raw_text(rng, 300)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> BPETokenizer:
    return train_bpe(corpus_texts(), 300, str(tmp_path_factory.mktemp("bpe")))


@pytest.fixture(params=["byte", "bpe"])
def tok(request, bpe):
    return ByteTokenizer() if request.param == "byte" else bpe


def all_texts() -> list[str]:
    rng = random.Random(1)
    return (ADVERSARIAL + [random_unicode(rng, rng.randint(1, 60)) for _ in range(300)]
            + [random_raw_text(rng, rng.randint(1, 80)) for _ in range(300)])


def test_byte_mapping_roundtrips_and_is_utf8_on_clean_text():
    for text in all_texts():
        assert bytes_to_text(text_to_bytes(text)) == text
        try:
            assert text_to_bytes(text) == text.encode("utf-8")
        except UnicodeEncodeError:
            pass


def test_raw_file_bytes_stay_raw():
    rng = random.Random(2)
    for _ in range(300):
        raw = bytes(rng.randrange(255) for _ in range(rng.randint(0, 50)))  # no 0xFF (escape byte)
        assert text_to_bytes(raw.decode("utf-8", "surrogateescape")) == raw


def test_roundtrip_random_unicode_and_raw_bytes(tok):
    texts = all_texts()
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert tok.decode(ids) == text, repr(text)
        assert tok.encode(text) == ids
        assert all(0 <= i < tok.vocab_size and i not in (tok.bos_id, tok.eos_id, tok.pad_id) for i in ids)


def test_decode_never_fails_on_arbitrary_ids(tok):
    rng = np.random.default_rng(0)
    for _ in range(50):
        assert isinstance(tok.decode(rng.integers(0, tok.vocab_size, 40).tolist()), str)


def test_token_bytes_sum_to_utf8_length(tok):
    rng = random.Random(3)
    texts = [t for t in ADVERSARIAL if t.encode("utf-8", "surrogatepass") == t.encode("utf-8", "replace")]
    texts += [corpus_texts()[0]]
    texts += [random_unicode(rng, 40).encode("utf-8", "replace").decode("utf-8") for _ in range(100)]
    tb = tok.token_bytes()
    assert tb.dtype == np.int32 and tb.shape == (tok.vocab_size,)
    assert tb[[tok.bos_id, tok.eos_id, tok.pad_id]].tolist() == [0, 0, 0]
    for text in texts:
        assert int(tb[tok.encode(text)].sum()) == len(text.encode("utf-8"))


def test_byte_tokenizer_ids_are_utf8_bytes():
    tok = ByteTokenizer()
    assert tok.encode("aé😀") == list("aé😀".encode("utf-8"))
    assert len({tok.bos_id, tok.eos_id, tok.pad_id} | set(range(256))) == tok.vocab_size


def test_bpe_compresses_and_survives_save_load(bpe, tmp_path):
    text = corpus_texts()[1]
    assert len(bpe.encode(text)) < 0.6 * len(text.encode())  # merges are really used
    bpe.save(str(tmp_path))
    loaded = load_tokenizer(f"bpe:{tmp_path}")
    texts = all_texts()
    assert loaded.encode_batch(texts) == bpe.encode_batch(texts)
    assert loaded.fingerprint() == bpe.fingerprint()
    assert (loaded.token_bytes() == bpe.token_bytes()).all()
    assert loaded.vocab_size == bpe.vocab_size == 300
    assert loaded.fingerprint() != ByteTokenizer().fingerprint()


def test_bpe_specials_are_never_produced_from_text(bpe):
    ids = bpe.encode("<|bos|><|eos|><|pad|>")
    assert not {bpe.bos_id, bpe.eos_id, bpe.pad_id} & set(ids)


def test_byte_save_load(tmp_path):
    ByteTokenizer().save(str(tmp_path))
    assert isinstance(ByteTokenizer.load(str(tmp_path)), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_load_tokenizer_errors(tmp_path, bpe):
    for spec in ("nope", "bpe", "byte:x", "bpe:"):
        with pytest.raises(ConfigError, match="data.tokenizer"):
            load_tokenizer(spec)
    missing = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match=f"data.tokenizer.*{missing}"):
        load_tokenizer(f"bpe:{missing}")
    byte_dir = str(tmp_path / "byte")
    ByteTokenizer().save(byte_dir)
    with pytest.raises(ConfigError, match=f"data.tokenizer.*{byte_dir}.*'byte'"):
        load_tokenizer(f"bpe:{byte_dir}")
    with pytest.raises(ConfigError, match=f"data.tokenizer.*{byte_dir}"):
        load_tokenizer(f"gqvae:{byte_dir}")
    bpe_dir = str(tmp_path / "bpe")
    bpe.save(bpe_dir)
    manifest = os.path.join(bpe_dir, MANIFEST)
    with open(manifest) as f:
        content = json.load(f)
    with open(manifest, "w") as f:
        json.dump({**content, "format_version": 99}, f)
    with pytest.raises(ConfigError, match=f"data.tokenizer.*{bpe_dir}.*format_version"):
        load_tokenizer(f"bpe:{bpe_dir}")


def test_bpe_vocab_size_bounds_and_an_empty_corpus_are_config_errors():
    # A raw ValueError (vocab below 259), a Rust abort asking for 141 GB (vocab 2e9), and a bare-byte
    # tokenizer saved as if trained (no text) were what these gave.
    from gqlm.tokenizers.bpe import MAX_VOCAB
    for vocab_size in (100, 258, MAX_VOCAB + 1, 2_000_000_000):
        with pytest.raises(ConfigError, match=f"vocab_size={vocab_size} must lie in"):
            train_bpe(["some text"], vocab_size)
    for texts in ([], [""], ["", ""]):
        with pytest.raises(ConfigError, match="got no text"):
            train_bpe(texts, 300)
    assert train_bpe(["ab"] * 3, 259).vocab_size == 259  # the smallest vocabulary: bytes + specials


def test_a_broken_or_foreign_bpe_file_names_the_directory(tmp_path, bpe):
    import tokenizers
    from tokenizers import models
    directory = str(tmp_path / "bpe")
    bpe.save(directory)
    file = os.path.join(directory, "tokenizer.json")
    foreign = tokenizers.Tokenizer(models.WordLevel({"\u2581hello": 0, "[UNK]": 1}, unk_token="[UNK]")).to_str()
    for content in (None, "{", '{"model": 1}', foreign):  # missing, cut, not a tokenizer, not byte-level
        if content is None:
            os.remove(file)
        else:
            with open(file, "w") as f:
                f.write(content)
        with pytest.raises(ConfigError, match=f"data.tokenizer: '{file}' is not a readable byte-level BPE") as info:
            load_tokenizer(f"bpe:{directory}")
        assert "\n" not in str(info.value)


def test_a_manifest_that_is_not_a_json_object_is_a_one_line_error(tmp_path):
    from gqlm.tokenizers.base import MANIFEST, TokenizerDirError, read_manifest
    (tmp_path / MANIFEST).write_text("[1, 2]")
    with pytest.raises(TokenizerDirError, match="holds a JSON list, not an object"):
        read_manifest(str(tmp_path), "bpe", 1)
