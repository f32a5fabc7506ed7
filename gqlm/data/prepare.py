"""Corpus -> tokenized ArrayRecord shards + meta.json, in a local process pool or on Apache Beam.

The unit of work is one input file: `prepare_input` streams its documents, puts each in the
validation split when a hash of its text says so (whatever the runner or worker count), encodes
them in batches and writes that file's shards (shards.py), then a done marker
`OUT/_done/<input>.json` with the shards' counts. Both runners call this one function, so they
write identical shards; re-running skips inputs whose marker exists, and a killed run leaves no
shard that meta.json lists half-written. `OUT/prepare.json` records what the directory is
prepared from; a re-run with other inputs or settings is refused. `meta.json`, written last from
the markers, is what training reads (data/prepared.py).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import multiprocessing
import os
import re
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from etils import epath

from gqlm.config import ConfigError
from gqlm.config.errors import check_choice
from gqlm.data import shards, sources
from gqlm.data.shards import ShardWriter
from gqlm.tokenizers import load_tokenizer
from gqlm.tokenizers.base import Tokenizer, text_to_bytes

FORMAT_VERSION = 2  # 2: long documents cut into records of at most RECORD_TOKENS (data/shards.py)
META, SPEC, DONE = "meta.json", "prepare.json", "_done"
SPLITS = ("train", "validation")
RUNNERS = ("local", "beam")
SHARD_BYTES = 256 << 20  # a new shard part past this many bytes
# An encode_batch call takes up to 64 documents or 1 MiB of text, whichever comes first: the
# tokenizer call is amortised, and a worker's peak memory does not grow with the corpus (a count
# alone let a run of long documents make one call, and the peak, as large as chance allowed).
ENCODE_BATCH, ENCODE_CHARS = 64, 1 << 20


class Spec(NamedTuple):
    """What a prepared directory is made from; equal specs make identical shards."""
    inputs: tuple[str, ...]
    tokenizer: str
    text_key: str = "text"
    format: str = ""
    validation_fraction: float = 0.005
    on_bad_record: str = "raise"
    shard_bytes: int = SHARD_BYTES


def is_validation(text: str, fraction: float) -> bool:
    """Deterministic per-document split: the first 8 bytes of SHA-256 of the text, as a fraction."""
    digest = hashlib.sha256(text_to_bytes(text)).digest()
    return int.from_bytes(digest[:8], "little") < fraction * 2.0**64


def _write_json(path: epath.Path, value: Any) -> None:
    """Atomic: a temporary file renamed over the target (`replace`: epath's `rename` refuses an
    existing target, and a re-run rewrites meta.json, a Beam retry a marker)."""
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)


@functools.lru_cache(maxsize=4)
def _tokenizer(spec: str) -> Tokenizer:
    return load_tokenizer(spec)  # once per worker process


# Where byte-level pretokenizers (GPT-2's regex) cut anyway, whatever comes after: after a single
# newline between non-spaces, or before a single space between non-spaces. (After "\n\n" they
# do not: at the end of a piece the two newlines would become one pretoken.)
_PIECE_CUT = re.compile(r"(?<=\S\n)(?=\S)|(?<=\S)(?= \S)")


def text_pieces(text: str, limit: int) -> Iterator[str]:
    """`text` in pieces of at most `limit` characters, cut where the pretokenizer cuts (where the
    piece has such a place), so the pieces encode to the ids of the whole."""
    start = 0
    while len(text) - start > limit:
        end = start + limit
        cut = end
        for match in _PIECE_CUT.finditer(text, start + 1, end + 2):  # +2: the lookahead sees 2 characters
            if match.start() <= end:
                cut = match.start()
        yield text[start:cut]
        start = cut
    yield text[start:]


def write_shards(tok: Tokenizer, documents: Iterable[tuple[str, str]], out: str, index: int,
                 shard_bytes: int) -> dict[str, list[dict[str, Any]]]:
    """Encodes (text, split) pairs in batches into input `index`'s shards of each split; returns
    their counts. On any error the part being written is removed."""
    writers = {s: ShardWriter(str(epath.Path(out) / s), index, shard_bytes) for s in SPLITS}
    pending: dict[str, list[tuple[str, bool]]] = {s: [] for s in SPLITS}  # (piece, starts a document)
    chars = dict.fromkeys(SPLITS, 0)

    def flush(split: str) -> None:
        pieces = pending[split]
        for (text, first), ids in zip(pieces, tok.encode_batch([text for text, _ in pieces])):
            writers[split].add(np.asarray(ids, np.uint32), len(text_to_bytes(text)), first)
        pieces.clear()
        chars[split] = 0

    try:
        for text, split in documents:
            # A piece of RECORD_TOKENS / 4 characters has at most RECORD_TOKENS byte-level tokens:
            # one record each, so records decode to text pieces on their own (document_texts).
            for k, piece in enumerate(text_pieces(text, shards.RECORD_TOKENS // 4)):
                pending[split].append((piece, k == 0))
                chars[split] += len(piece)
                if len(pending[split]) >= ENCODE_BATCH or chars[split] >= ENCODE_CHARS:
                    flush(split)
        for split in SPLITS:
            flush(split)
        return {s: [w._asdict() for w in writers[s].finish()] for s in SPLITS}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise


def prepare_input(spec: Spec, out: str, index: int) -> dict[str, Any]:
    """Tokenizes and writes one input file's shards and its done marker; returns the marker."""
    path, bad = spec.inputs[index], sources.Counter()
    stat = input_stat(path)  # before reading: a file changed meanwhile is redone by the next run
    documents = sources.read_documents(path, index, spec.text_key, spec.format, spec.on_bad_record, bad)
    split_of = lambda text: "validation" if is_validation(text, spec.validation_fraction) else "train"  # noqa: E731
    shards = write_shards(_tokenizer(spec.tokenizer), ((d.text, split_of(d.text)) for d in documents),
                          out, index, spec.shard_bytes)
    marker = {"input": path, "stat": stat, "skipped_records": bad.skipped, "shards": shards}
    _write_json(epath.Path(out) / DONE / f"{index:05d}.json", marker)
    return marker


def input_stat(path: str) -> list[int]:
    """[size, mtime] of an input file: a done marker holding others is out of date."""
    stat = epath.Path(path).stat()
    return [int(stat.length), int(stat.mtime)]


def _is_done(root: epath.Path, spec: Spec, index: int) -> bool:
    """Whether input `index` has a marker from its current content; an outdated one is removed,
    with the input's shards (a shorter new version would leave old parts beside its own)."""
    marker = root / DONE / f"{index:05d}.json"
    if not marker.exists():
        return False
    if json.loads(marker.read_text()).get("stat") == input_stat(spec.inputs[index]):
        return True
    marker.unlink()
    for split in SPLITS:
        for shard in (root / split).glob(f"{index:05d}-*"):
            shard.unlink()
    return False


def start(spec: Spec, out: str) -> list[int]:
    """Creates OUT (or checks that it holds this spec's run) and returns the inputs still to do."""
    root = epath.Path(out)
    for sub in ("", DONE, *SPLITS):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for stale in (root / sub).glob(".tmp-*"):  # parts of a killed run: never listed, now removed
            stale.unlink()
    tok = _tokenizer(spec.tokenizer)
    wanted = {**spec._asdict(), "inputs": list(spec.inputs), "tokenizer_fingerprint": tok.fingerprint(),
              "format_version": FORMAT_VERSION}
    if (root / SPEC).exists():
        previous = json.loads((root / SPEC).read_text())
        if previous != wanted:
            changed = sorted(k for k in set(previous) | set(wanted) if previous.get(k) != wanted.get(k))
            raise ConfigError(f"--out={out!r} holds a prepare run of other {', '.join(changed)}; "
                              "choose a new --out (or delete it)")
    else:
        _write_json(root / SPEC, wanted)
    pending = [i for i in range(len(spec.inputs)) if not _is_done(root, spec, i)]
    if pending and (root / META).exists():
        (root / META).unlink()  # it lists shards being redone: training waits for the new one
    return pending


def run_local(spec: Spec, out: str, pending: Sequence[int], workers: int) -> None:
    """A process pool over the pending inputs (spawned: tokenizers may hold JAX state)."""
    if workers <= 1 or len(pending) <= 1:
        for i in pending:
            prepare_input(spec, out, i)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(prepare_input, spec, out, i) for i in pending]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()  # the first error stops the run (its input keeps no marker)
        except BaseException:
            # else leaving `with` waited for every queued input: a bad first file was reported after all the rest
            pool.shutdown(cancel_futures=True)
            raise


def run_beam(spec: Spec, out: str, pending: Sequence[int], beam_options: Sequence[str]) -> None:
    """The same per-input transform as a Beam pipeline (DirectRunner here; Dataflow/Flink/Spark)."""
    import apache_beam as beam  # the `beam` extra: only this runner needs it
    from apache_beam.options.pipeline_options import PipelineOptions

    with beam.Pipeline(options=PipelineOptions(list(beam_options))) as pipeline:
        _ = (pipeline | "inputs" >> beam.Create(list(pending)) | "spread" >> beam.Reshuffle()
             | "prepare" >> beam.Map(lambda i: prepare_input(spec, out, i)["input"]))


def finish(spec: Spec, out: str) -> dict[str, Any]:
    """meta.json from the done markers."""
    markers = [json.loads((epath.Path(out) / DONE / f"{i:05d}.json").read_text()) for i in range(len(spec.inputs))]
    return write_meta(out, _tokenizer(spec.tokenizer), spec.tokenizer, [m["shards"] for m in markers],
                      inputs=[{"path": m["input"], "size": m["stat"][0]} for m in markers],  # stat'd once, when read
                      text_key=spec.text_key, validation_fraction=spec.validation_fraction,
                      skipped_records=sum(m["skipped_records"] for m in markers))


def write_meta(out: str, tok: Tokenizer, tokenizer_spec: str, shards_per_input: list[dict[str, list]],
               **fields: Any) -> dict[str, Any]:
    """Writes meta.json: `fields` (what the corpus was made from), the tokenizer, and counts per
    split and per shard, in input order."""
    splits = {}
    for split in SPLITS:
        shards = [dict(shard, name=f"{split}/{shard['name']}") for per in shards_per_input for shard in per[split]]
        totals = {k: sum(s[k] for s in shards) for k in ("documents", "records", "tokens", "bytes")}
        splits[split] = {**totals, "shards": shards}
    meta = {"format_version": FORMAT_VERSION, **fields, "tokenizer": tokenizer_spec,
            "tokenizer_fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "pad_id": tok.pad_id, "splits": splits}
    _write_json(epath.Path(out) / META, meta)
    return meta


def prepare_documents(out: str, tok: Tokenizer, tokenizer_spec: str, documents: Iterable[tuple[str, str]],
                      **fields: Any) -> dict[str, Any]:
    """Prepares (text, split) pairs in one process (the built-in corpora, on first use): written
    beside `out` and renamed into place whole, so `out` is either absent or complete."""
    tmp = f"{out}.tmp-{os.getpid()}"
    for split in SPLITS:
        os.makedirs(os.path.join(tmp, split), exist_ok=True)
    meta = write_meta(tmp, tok, tokenizer_spec, [write_shards(tok, documents, tmp, 0, SHARD_BYTES)],
                      **fields)
    os.replace(tmp, out)
    return meta


def prepare(spec: Spec, out: str, runner: str = "local", workers: int = 1,
            beam_options: Sequence[str] = ()) -> dict[str, Any]:
    """Prepares (or finishes preparing) `spec` into `out`; returns its meta.json."""
    if not 0 <= spec.validation_fraction < 1:
        raise ConfigError(f"--validation_fraction={spec.validation_fraction} must lie in [0, 1)")
    check_choice("--on_bad_record", spec.on_bad_record, sources.ON_BAD_RECORD)
    check_choice("--runner", runner, RUNNERS)
    for path in spec.inputs:  # an unreadable format fails now, before OUT is made
        sources.format_of(path, spec.format)
    pending = start(spec, out)
    if runner == "beam":
        run_beam(spec, out, pending, beam_options)
    else:
        run_local(spec, out, pending, workers)
    return finish(spec, out)

