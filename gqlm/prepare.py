"""python -m gqlm.prepare --input 'DIR/*.parquet' [--input ...] --tokenizer SPEC --out OUT [options]

Tokenizes a corpus once into sharded ArrayRecord files + meta.json (gqlm/data/prepare.py), which
training reads with `--config.data.corpus=prepared --config.data.sources=OUT[=weight],...`.
Formats by extension (`.parquet`; `.jsonl` or `.json`: JSON lines; else text, one document per
file; `.gz` / `.zst` after the last two is decompressed) or `--format`. `--runner=local` uses a
process pool of `--workers`; `--runner=beam` runs the same transform on Apache Beam
(`--beam_options="--runner=DataflowRunner --project=..."`, see BUILD.md). Re-running the same command resumes. Exit codes: 0 done, 2 bad input.
"""

import json
import os
import shlex
import time

from absl import flags

from gqlm import cli
from gqlm.data import sources
from gqlm.data.prepare import RUNNERS, Spec, prepare

flags.DEFINE_multi_string("input", None, "Input files: a path or glob (local or gs://); repeatable.")
flags.DEFINE_string("tokenizer", "byte", "Tokenizer spec, as data.tokenizer: byte | bpe:DIR | gqvae:DIR.")
flags.DEFINE_string("out", None, "Output directory (local or gs://).")
flags.DEFINE_string("text_key", "text", "The text field of jsonl records and parquet rows.")
flags.DEFINE_string("format", "", f"Force one format: {', '.join(sources.FORMATS)} (default: by extension).")
flags.DEFINE_float("validation_fraction", 0.005, "Fraction of documents (chosen by a hash of their text) held out.")
flags.DEFINE_enum("runner", "local", RUNNERS, "local: a process pool; beam: an Apache Beam pipeline.")
flags.DEFINE_integer("workers", os.cpu_count() or 1, "--runner=local: worker processes.")
flags.DEFINE_string("beam_options", "--direct_num_workers=2 --direct_running_mode=multi_processing",
                    "--runner=beam: Beam pipeline options (shell-quoted).")
flags.DEFINE_enum("on_bad_record", "raise", sources.ON_BAD_RECORD, "raise: stop at a malformed record; skip: count it.")
flags.DEFINE_integer("shard_mb", 256, "Start a new output shard past this many MB.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.input or not FLAGS.out:
        cli.fail("--input and --out are required")
    sources.check_remote(FLAGS.out, "--out")
    spec = Spec(tuple(sources.expand(FLAGS.input)), FLAGS.tokenizer, FLAGS.text_key, FLAGS.format,
                FLAGS.validation_fraction, FLAGS.on_bad_record, FLAGS.shard_mb << 20)
    start = time.perf_counter()
    meta = prepare(spec, FLAGS.out, FLAGS.runner, FLAGS.workers, shlex.split(FLAGS.beam_options))
    summary = {split: {k: v for k, v in s.items() if k != "shards"} for split, s in meta["splits"].items()}
    print(json.dumps({"out": FLAGS.out, "inputs": len(spec.inputs), "skipped_records": meta["skipped_records"],
                      **summary, "seconds": round(time.perf_counter() - start, 3)}))


if __name__ == "__main__":
    cli.run(main)
