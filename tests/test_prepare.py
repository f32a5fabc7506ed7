"""Corpus preparation: readers for every format, bad records, shards that round-trip every
document, the per-document validation hash, resume after a failure, and Beam == local."""

import gzip
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from gqlm.config import ConfigError
from gqlm.data import prepare as prepare_lib
from gqlm.data import sources
from gqlm.data.prepare import Spec, prepare
from gqlm.data.shards import decode_record
from gqlm.tokenizers.base import text_to_bytes

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
RNG = np.random.default_rng(0)
WORDS = ["the", "king", "queen", "é", "naïve", "日本", "🙂", "\n", "to", "be", "or", "not"]


def random_docs(n, max_words=300):
    return [" ".join(RNG.choice(WORDS, int(RNG.integers(1, max_words)))) for _ in range(n)]


def write_corpus(root):
    """One file of each format; returns {path: its documents}."""
    docs = {}
    docs[root / "a.jsonl"] = random_docs(120)
    (root / "a.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[root / "a.jsonl"])))
    docs[root / "b.jsonl.gz"] = random_docs(80)
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[root / "b.jsonl.gz"])
    docs[root / "c.jsonl.zst"] = random_docs(60)
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": d}) + "\n" for d in docs[root / "c.jsonl.zst"]).encode()))
    docs[root / "d.parquet"] = random_docs(3000, 20)
    pq.write_table(pa.table({"text": docs[root / "d.parquet"], "n": list(range(3000))}), root / "d.parquet",
                   row_group_size=500)
    docs[root / "e.txt"] = ["a whole file is one document\nwith lines é"]
    (root / "e.txt").write_text(docs[root / "e.txt"][0])
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, write_corpus(root)


def read_split(out, split):
    """Every document of a prepared split, decoded: [(ids, num_bytes)] in shard order."""
    meta = json.loads((out / "meta.json").read_text())
    from array_record.python.array_record_module import ArrayRecordReader
    docs = []
    for shard in meta["splits"][split]["shards"]:
        reader = ArrayRecordReader(str(out / shard["name"]))
        docs += [decode_record(r) for r in reader.read_all()]
        reader.close()
    return docs


def test_every_format_reads_back_its_documents(corpus):
    root, docs = corpus
    for index, (path, want) in enumerate(docs.items()):
        got = list(sources.read_documents(str(path), index))
        assert [d.text for d in got] == want, path.name
        assert all(d.file_index == index for d in got)


def test_documents_in_equal_documents_out_and_the_split_follows_the_hash(corpus, tmp_path):
    root, docs = corpus
    files = sorted(str(p) for p in docs)
    spec = Spec(tuple(files), "byte", validation_fraction=0.1, shard_bytes=20_000)  # several parts per file
    meta = prepare(spec, str(tmp_path / "out"), workers=2)
    everything = [d for f in files for d in docs[next(p for p in docs if str(p) == f)]]

    def expected(split):
        fraction = 0.1 * 2.0**64
        keep = [d for d in everything
                if (int.from_bytes(hashlib.sha256(text_to_bytes(d)).digest()[:8], "little") < fraction)
                == (split == "validation")]
        return [(list(text_to_bytes(d)), len(text_to_bytes(d))) for d in keep]

    for split in ("train", "validation"):
        got = [(ids.tolist(), n) for ids, n in read_split(tmp_path / "out", split)]
        assert got == expected(split), split
        assert meta["splits"][split]["documents"] == len(got)
        assert meta["splits"][split]["tokens"] == sum(len(i) for i, _ in got)
    assert 0.05 < meta["splits"]["validation"]["documents"] / len(everything) < 0.15
    assert len(meta["splits"]["train"]["shards"]) > len(files)  # rolled over at shard_bytes
    for shard in meta["splits"]["train"]["shards"]:  # the index: cumulative stream length with BOS/EOS
        index = np.load(tmp_path / "out" / (shard["name"] + ".index.npy"))
        assert index[-1, 0] == shard["tokens"] + 2 * shard["documents"]
        assert index[-1, 1] == shard["documents"] - 1 and len(index) == shard["records"]


def test_bpe_shards_decode_to_the_documents(corpus, tmp_path):
    from gqlm.tokenizers.bpe import BPETokenizer, train_bpe
    root, docs = corpus
    train_bpe(random_docs(200), 400, str(tmp_path / "bpe"))
    prepare(Spec((str(root / "a.jsonl"),), f"bpe:{tmp_path / 'bpe'}", validation_fraction=0.0), str(tmp_path / "out"))
    tok = BPETokenizer.load(str(tmp_path / "bpe"))
    assert [tok.decode(ids) for ids, _ in read_split(tmp_path / "out", "train")] == docs[root / "a.jsonl"]


def test_bad_records_name_the_file_and_line_or_are_skipped(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "cut\n{"other": 1}\n{"text": "fine"}\n')
    with pytest.raises(sources.SourceError, match=f"{bad}:2: malformed JSON"):
        list(sources.read_documents(str(bad), 0))
    counter = sources.Counter()
    texts = [d.text for d in sources.read_documents(str(bad), 0, on_bad_record="skip", bad=counter)]
    assert texts == ["ok", "fine"] and counter.skipped == 2
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"text": "a"}\n{"text": "b"}\n{"other": 1}\n')
    with pytest.raises(sources.SourceError, match=f"{no_text}:3: no string field 'text'"):
        list(sources.read_documents(str(no_text), 0))


@pytest.mark.parametrize("name,content,message", [
    ("x.jsonl.gz", b"\x1f\x8b\x08\x00not really gzip", "unreadable jsonl.gz stream"),
    ("x.jsonl.zst", b"\x28\xb5\x2f\xfd garbage", "unreadable jsonl.zst stream"),
    ("x.parquet", b"PAR1 not parquet", "not a readable parquet file"),
])
def test_unreadable_files_are_one_line_errors(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(sources.SourceError, match=message) as info:
        list(sources.read_documents(str(tmp_path / name), 0))
    assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value)


def test_parquet_without_the_text_column_and_empty_globs(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(sources.SourceError, match="no column 'text'.*body"):
        list(sources.read_documents(str(tmp_path / "p.parquet"), 0))
    with pytest.raises(ConfigError, match="matches no file"):
        sources.expand([str(tmp_path / "*.nothing")])


def test_a_failed_input_leaves_no_shard_and_a_rerun_finishes_identically(corpus, tmp_path, monkeypatch):
    root, docs = corpus
    spec = Spec(tuple(sorted(str(p) for p in docs)), "byte", validation_fraction=0.1, shard_bytes=20_000)
    reference = prepare(spec, str(tmp_path / "ref"))
    real = prepare_lib.ShardWriter.add
    calls = {"n": 0}

    def failing_add(self, *args):  # dies inside the parquet file, mid-shard
        calls["n"] += 1
        if calls["n"] == 400:
            raise KeyboardInterrupt("killed")
        return real(self, *args)

    monkeypatch.setattr(prepare_lib.ShardWriter, "add", failing_add)
    with pytest.raises(KeyboardInterrupt):
        prepare(spec, str(tmp_path / "out"))
    out = tmp_path / "out"
    assert not (out / "meta.json").exists()
    assert not [f for s in ("train", "validation") for f in os.listdir(out / s) if f.startswith(".tmp")]
    monkeypatch.setattr(prepare_lib.ShardWriter, "add", real)
    assert prepare(spec, str(out))["splits"] == reference["splits"]
    for split in ("train", "validation"):
        for shard in reference["splits"][split]["shards"]:
            assert (out / shard["name"]).read_bytes() == (tmp_path / "ref" / shard["name"]).read_bytes()


def test_rerunning_a_finished_prepare_returns_the_same_meta(corpus, tmp_path):
    # epath's rename refused an existing meta.json: the documented "re-running resumes" crashed
    # with a FileExistsError traceback once a run had finished, and left a .tmp-meta.json behind.
    root, docs = corpus
    spec = Spec((str(root / "a.jsonl"), str(root / "e.txt")), "byte", validation_fraction=0.1)
    out = tmp_path / "out"
    first = prepare(spec, str(out))
    (out / ".tmp-meta.json-999999").write_text("{")  # a killed run's half-written meta
    assert prepare(spec, str(out)) == first == json.loads((out / "meta.json").read_text())
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


def test_compressed_text_files_are_decompressed_and_other_compressions_refused(tmp_path):
    # A .txt.gz / .txt.zst input was tokenized as its compressed bytes, silently.
    text = "plain text, é 日本 🙂\r\nsecond line\x00\n" * 50
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "b.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    (tmp_path / "c.txt").write_text(text, newline="")
    files = [str(tmp_path / n) for n in ("a.txt.gz", "b.zst", "c.txt")]
    prepare(Spec(tuple(files), "byte", validation_fraction=0.0), str(tmp_path / "out"))
    assert [(ids.tolist(), n) for ids, n in read_split(tmp_path / "out", "train")] == [
        (list(text.encode()), len(text.encode()))] * 3
    (tmp_path / "d.txt.bz2").write_bytes(b"BZh9 whatever")
    with pytest.raises(sources.SourceError, match=r"d.txt.bz2: .bz2 files are not read") as info:
        prepare(Spec((files[0], str(tmp_path / "d.txt.bz2")), "byte"), str(tmp_path / "out2"))
    assert "\n" not in str(info.value) and not (tmp_path / "out2").exists()  # refused before OUT is made
    (tmp_path / "e.txt.gz").write_bytes(b"not gzip")
    with pytest.raises(sources.SourceError, match="e.txt.gz: unreadable txt.gz file"):
        list(sources.read_documents(str(tmp_path / "e.txt.gz"), 0))


def test_json_files_are_json_lines_and_a_pretty_printed_one_says_how_to_read_it(tmp_path):
    docs = random_docs(30)
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    (tmp_path / "c4-train.00000-of-01024.json.gz").write_bytes(gzip.compress(lines.encode()))  # C4's naming
    (tmp_path / "b.json").write_text(lines)
    for name in ("c4-train.00000-of-01024.json.gz", "b.json"):
        assert [d.text for d in sources.read_documents(str(tmp_path / name), 0)] == docs, name
    (tmp_path / "pretty.json").write_text(json.dumps({"text": "one"}, indent=2))
    with pytest.raises(sources.SourceError, match="pretty.json:1: malformed JSON.*--format=txt"):
        list(sources.read_documents(str(tmp_path / "pretty.json"), 0))
    assert [d.text for d in sources.read_documents(str(tmp_path / "pretty.json"), 0, fmt="txt")] == [
        json.dumps({"text": "one"}, indent=2)]


def test_an_input_changed_since_its_shards_were_written_is_redone(tmp_path):
    first, second = random_docs(40), random_docs(5)
    for name, docs in (("a.jsonl", first), ("b.jsonl", first[:3])):
        (tmp_path / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    spec = Spec((str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")), "byte", validation_fraction=0.0,
                shard_bytes=500)
    before = prepare(spec, str(tmp_path / "out"))
    assert len(before["splits"]["train"]["shards"]) > 3  # a.jsonl has several parts; the new one has fewer
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in second))
    os.utime(tmp_path / "a.jsonl", (1, 1))  # a new mtime even within the same second
    after = prepare(spec, str(tmp_path / "out"))
    got = [bytes(ids.astype(np.uint8)).decode() for ids, _ in read_split(tmp_path / "out", "train")]
    assert got == second + first[:3]
    listed = {s["name"].split("/")[1] for s in after["splits"]["train"]["shards"]}
    on_disk = {f for f in os.listdir(tmp_path / "out" / "train") if f.endswith(".array_record")}
    assert on_disk == listed  # the old version's extra parts are gone


def test_a_bad_input_stops_the_pool_without_preparing_every_other_input(tmp_path):
    # The pool's `with` waited for every queued input before the first error came out.
    (tmp_path / "00.jsonl").write_text("not json\n")
    for i in range(1, 25):
        (tmp_path / f"{i:02d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in random_docs(300)))
    spec = Spec(tuple(sorted(str(p) for p in tmp_path.glob("*.jsonl"))), "byte")
    with pytest.raises(sources.SourceError, match="00.jsonl:1: malformed JSON"):
        prepare(spec, str(tmp_path / "out"), workers=2)
    assert len(os.listdir(tmp_path / "out" / "_done")) < 24 - 4  # at most the running and queued (workers + 1)


def test_another_spec_on_the_same_out_is_refused(corpus, tmp_path):
    root, docs = corpus
    prepare(Spec((str(root / "e.txt"),), "byte"), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="holds a prepare run of other validation_fraction"):
        prepare(Spec((str(root / "e.txt"),), "byte", validation_fraction=0.5), str(tmp_path / "out"))


def run_prepare(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "gqlm.prepare", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_bad_input_is_one_line_exit_2_and_skip_reports_the_count(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    result = run_prepare(f"--input={bad}", f"--out={tmp_path / 'out'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert f"{bad}:2: malformed JSON" in result.stderr
    assert not (tmp_path / "out" / "meta.json").exists()
    result = run_prepare(f"--input={bad}", f"--out={tmp_path / 'out2'}", "--on_bad_record=skip")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["skipped_records"] == 1
    result = run_prepare(f"--input={tmp_path / 'none*.jsonl'}", f"--out={tmp_path / 'out3'}")
    assert result.returncode == 2 and "matches no file" in result.stderr


@pytest.mark.slow
def test_beam_and_local_runners_write_identical_shards(corpus, tmp_path):
    root, docs = corpus
    spec = Spec(tuple(sorted(str(p) for p in docs)), "byte", validation_fraction=0.1, shard_bytes=20_000)
    local = prepare(spec, str(tmp_path / "local"), workers=2)
    beam = prepare(spec, str(tmp_path / "beam"), runner="beam",
                   beam_options=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert beam["splits"] == local["splits"]
    names = [s["name"] for split in local["splits"].values() for s in split["shards"]]
    for name in names:
        for suffix in ("", ".index.npy"):
            assert (tmp_path / "beam" / (name + suffix)).read_bytes() == (tmp_path / "local" / (name + suffix)).read_bytes()


def test_the_tokenizer_sample_is_deterministic_bounded_and_spans_the_files(corpus):
    root, docs = corpus
    files = [str(root / "a.jsonl"), str(root / "d.parquet")]
    sample = list(sources.sample_documents(files, 20_000))
    assert sample == list(sources.sample_documents(files, 20_000))
    from_a = [t for t in sample if t in set(docs[root / "a.jsonl"])]
    assert from_a and len(from_a) < len(sample)  # both files contribute
    size = sum(len(t.encode()) for t in sample)
    longest = max(len(t.encode()) for d in docs.values() for t in d)
    assert 20_000 <= size <= 20_000 + 2 * longest


def test_tokenize_cli_learns_a_bpe_from_a_streamed_sample(corpus, tmp_path):
    root, _ = corpus
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "gqlm.tokenize", "--kind=bpe", f"--input={root}/*.jsonl*",
                             "--vocab_size=400", "--sample_bytes=50000", f"--out={tmp_path / 'bpe'}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "held-out documents of the --input sample" in result.stdout
    from gqlm.tokenizers.bpe import BPETokenizer
    tok = BPETokenizer.load(str(tmp_path / "bpe"))
    assert 300 < tok.vocab_size <= 400  # the sample's few words allow fewer merges than asked
    assert tok.decode(tok.encode("the king é 🙂")) == "the king é 🙂"


def test_tokenize_cli_bad_vocab_is_one_line_and_bad_records_can_be_skipped(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the king and the queen"}\nnot json\n' * 20)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def tokenize(*args):
        return subprocess.run([sys.executable, "-m", "gqlm.tokenize", "--kind=bpe", f"--input={bad}",
                               f"--out={tmp_path / 'bpe'}", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)

    result = tokenize("--vocab_size=100", "--on_bad_record=skip")  # was a ValueError traceback, exit 1
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr[-2000:]
    assert "vocab_size=100 must lie in" in result.stderr and not (tmp_path / "bpe").exists()
    result = tokenize("--vocab_size=300", "--on_bad_record=skip")  # the flag gqlm.prepare has (it had none)
    assert result.returncode == 0, result.stderr[-2000:]
    from gqlm.tokenizers.bpe import BPETokenizer
    tok = BPETokenizer.load(str(tmp_path / "bpe"))
    assert len(tok.encode("the king and the queen")) < len("the king and the queen")  # learned from the good lines


@pytest.mark.slow
def test_kill_9_during_prepare_then_rerun_gives_the_same_shards(tmp_path):
    import signal
    import time
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(24):  # ~24 x 1.5 MB: seconds of work, so the kill lands mid-run
        (corpus / f"{i:02d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in random_docs(600, 500)))
    args = [f"--input={corpus}/*.jsonl", "--workers=1", "--validation_fraction=0.1", "--shard_mb=1"]
    assert run_prepare(*args, f"--out={tmp_path / 'ref'}").returncode == 0
    out = tmp_path / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "gqlm.prepare", *args, f"--out={out}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "_done" / "00003.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "meta.json").exists() and len(os.listdir(out / "_done")) < 24
    result = run_prepare(*args, f"--out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    want = json.loads((tmp_path / "ref" / "meta.json").read_text())
    got = json.loads((out / "meta.json").read_text())
    assert got["splits"] == want["splits"]
    for split in ("train", "validation"):
        assert not [f for f in os.listdir(out / split) if f.startswith(".tmp")]
        for shard in want["splits"][split]["shards"]:
            for suffix in ("", ".index.npy"):
                name = shard["name"] + suffix
                assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
