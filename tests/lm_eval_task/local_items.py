"""Loads shakespeare.jsonl (next to this file, so the tasks work from any directory) as the test
split of one kind of item: `mc` (multiple choice), `ppl` (whole passages) or `gen` (a line to finish).

Called by lm-eval through each task YAML's `custom_dataset: !function local_items.load`, with the
task's `dataset_kwargs` and metadata as keywords. Nothing is downloaded or cached.
"""

import json
import os

import datasets

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare.jsonl")


def load(kind: str, **metadata) -> datasets.DatasetDict:
    with open(DATA, encoding="utf-8") as f:
        rows = [row for row in map(json.loads, f) if row.pop("kind") == kind]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
