"""gs:// inputs and outputs of `gqlm.prepare`, through a fake GCS: an fsspec filesystem registered
as the `gs` protocol that stores `gs://bucket/key` under a local folder. etils epath reaches
gs:// through fsspec (gcsfs on a real bucket, the `gcs` extra), so the same calls run here."""

import json
import shutil

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from gqlm.config import ConfigError
from gqlm.config.data import parse_sources
from gqlm.data import sources
from gqlm.data.prepare import Spec, prepare
from test_prepare import read_split, write_corpus


class FakeGCS(LocalFileSystem):
    """gs://bucket/key <-> ROOT/bucket/key."""
    protocol = ("gs", "gcs")
    root = None

    def __init__(self, *args, **kwargs):
        kwargs.pop("finalize_on_close", None)  # a gcsfs option epath passes
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                return f"{cls.root}/{path[len(prefix):]}".rstrip("/")
        return super()._strip_protocol(path)

    def glob(self, path, **kwargs):  # gcsfs answers "bucket/key", which epath prefixes with gs://
        return [p[len(self.root) + 1:] for p in super().glob(path, **kwargs)]


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    root = tmp_path / "gcs"
    (root / "bucket").mkdir(parents=True)
    monkeypatch.setattr(FakeGCS, "root", str(root))
    for protocol in FakeGCS.protocol:
        fsspec.register_implementation(protocol, FakeGCS, clobber=True)
    from etils.epath import backend
    backend.fsspec_backend._get_filesystem.cache_clear()
    yield root / "bucket"
    backend.fsspec_backend._get_filesystem.cache_clear()


def test_prepare_reads_gs_inputs_and_writes_gs_output_like_local(fake_gcs, tmp_path):
    docs = write_corpus(fake_gcs)
    local = tmp_path / "local"
    shutil.copytree(fake_gcs, local)
    files = sources.expand(["gs://bucket/*.jsonl*", "gs://bucket/*.parquet", "gs://bucket/e.txt"])
    assert files == [f"gs://bucket/{n}" for n in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet", "e.txt")]
    meta = prepare(Spec(tuple(files), "byte", validation_fraction=0.1, shard_bytes=20_000), "gs://bucket/out")
    out = fake_gcs / "out"
    assert json.loads((out / "meta.json").read_text()) == meta
    assert [i["path"] for i in meta["inputs"]] == files
    everything = [d for path in sorted(docs, key=str) for d in docs[path]]
    decoded = [bytes(ids.tolist()).decode() for split in ("train", "validation") for ids, _ in read_split(out, split)]
    assert sorted(decoded) == sorted(everything)
    local_files = [str(local / f.rsplit("/", 1)[1]) for f in files]
    prepare(Spec(tuple(local_files), "byte", validation_fraction=0.1, shard_bytes=20_000), str(tmp_path / "lout"))
    for split in ("train", "validation"):
        for shard in meta["splits"][split]["shards"]:
            assert (out / shard["name"]).read_bytes() == (tmp_path / "lout" / shard["name"]).read_bytes()


def test_training_sources_on_gs_are_refused_with_the_way_to_mount_them():
    with pytest.raises(ConfigError, match=r"data.sources.*gs://bucket/out.*gcsfuse"):
        parse_sources("gs://bucket/out=1")


def test_a_missing_remote_filesystem_is_a_one_line_error(monkeypatch):
    def missing(protocol):
        raise ImportError("Please install gcsfs to access Google Storage")
    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    with pytest.raises(ConfigError, match=r"--input='gs://b/\*.jsonl'.*gcsfs.*\[gcs\]"):
        sources.expand(["gs://b/*.jsonl"])
