"""GQ-VAE trained on prepared corpora (`data.corpus=prepared`, `data.sources`): the documents come
back as text, mixed by weight, and the runner trains on them like on a built-in corpus."""

import os

import numpy as np

from gqlm import config as config_lib
from gqlm.data.prepare import prepare_documents
from gqlm.data.prepared import PreparedSplit, document_texts, read_meta
from gqlm.tokenizers import load_tokenizer
from gqlm.tokenizers.gqvae.pretokenize import corpus_pieces
from gqlm.train.loop import train
from gqlm.train.tasks.gqvae.task import GQVAETask

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PROSE = [f"Sweet prince, the {w} of night is come; good {w}, and flights of angels sing thee to rest."
         for w in ("hour", "watch", "dark", "end", "dew", "fall", "song", "star")] * 6
CODE = [f"def {name}(x):\n    return [y * {k} for y in x if y > {k}]\n"
        for k, name in enumerate(("scale", "grow", "pick", "keep", "drop", "fold") * 6)]


def prepared(tmp_path, name, docs):
    """A byte-tokenized prepared directory: every third document in validation."""
    out = str(tmp_path / name)
    pairs = [(text, "validation" if i % 3 == 2 else "train") for i, text in enumerate(docs)]
    prepare_documents(out, load_tokenizer("byte"), "byte", pairs)
    return out


def test_documents_come_back_as_text_mixed_by_weight(tmp_path):
    tok = load_tokenizer("byte")
    dirs = [prepared(tmp_path, "prose", PROSE), prepared(tmp_path, "code", CODE)]
    splits = [PreparedSplit(d, "train", read_meta(d, tok)) for d in dirs]
    texts = list(document_texts(splits, [0.75, 0.25], tok, chunk=1))
    train_docs = [[t for i, t in enumerate(docs) if i % 3 != 2] for docs in (PROSE, CODE)]
    # Every document once, each source's in its own order.
    assert [t for t in texts if t.startswith("Sweet")] == train_docs[0]
    assert [t for t in texts if t.startswith("def")] == train_docs[1]
    # While both sources last, the character shares follow the weights (to within one document).
    chars = np.cumsum([[len(t), 0] if t.startswith("Sweet") else [0, len(t)] for t in texts], axis=0)
    both = [c for c in chars if c[0] < sum(map(len, train_docs[0])) and c[1] < sum(map(len, train_docs[1]))]
    longest = max(map(len, PROSE + CODE))
    for prose_chars, code_chars in both[4:]:
        assert abs(prose_chars - 3 * code_chars) <= 3 * longest


def test_the_runner_trains_a_gqvae_on_weighted_sources(tmp_path):
    dirs = [prepared(tmp_path, "prose", PROSE), prepared(tmp_path, "code", CODE)]
    config = config_lib.load_experiment(os.path.join(ROOT, "experiments", "gqvae_shakespeare.py:smoke"))
    config = config_lib.apply_overrides(config, {
        "data.corpus": "prepared", "data.sources": f"{dirs[0]}=0.5,{dirs[1]}=0.5", "data.tokenizer": "byte",
        "train.steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2})
    task = GQVAETask()
    train(config, str(tmp_path / "gq"), task=task)
    pieces = {bytes(row[row < 256].astype(np.uint8)) for row in task._pieces["train"]}
    want, _ = corpus_pieces(PROSE[:2] + CODE[:2], config.gqvae.max_pretoken_len)
    assert {bytes(row[row < 256].astype(np.uint8)) for row in want} <= pieces  # both sources' pieces
    assert os.path.exists(tmp_path / "gq" / "metrics.jsonl")
