"""The `gqlm.score` file format: one Parquet row per document (doc, name, nats, bytes, tokens),
with the corpus, split, tokenizer and checkpoint in the file's metadata, so that data selection
(selection.py) can check two score files describe the same documents."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gqlm.config import ConfigError
from gqlm.files import atomic_path

COLUMNS = ("doc", "name", "nats", "bytes", "tokens")


def write_scores(path: str, scores: dict[str, np.ndarray], names: list[str], meta: dict) -> None:
    table = pa.table({"doc": np.arange(len(names)), "name": names, "nats": scores["nats"],
                      "bytes": scores["bytes"].astype(np.int64), "tokens": scores["tokens"].astype(np.int64)})
    table = table.replace_schema_metadata({"gqlm": json.dumps(meta)})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:  # a killed write leaves no half file at `path`
        pq.write_table(table, tmp)


def read_scores(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """(columns, metadata) of a score file; a missing or foreign file is a one-line error."""
    if not os.path.isfile(path):
        raise ConfigError(f"score file {path!r} does not exist")
    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"gqlm"])
        columns = {c: table.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS}
    except Exception as e:  # not parquet, not written by gqlm.score, or a column missing
        raise ConfigError(f"{path!r} is not a gqlm.score file ({type(e).__name__}: {str(e)[:100]})")
    return columns, meta


