"""Statistics of a tokenization, per pretoken: token classes, where tokens end inside pretokens, the
most frequent tokens (benchmarks/gqvae_code_vs_prose.py; flag-free, so tests import it)."""

from __future__ import annotations

import collections
import itertools
from typing import Any, Sequence

from gqlm.tokenizers.base import text_to_bytes

CLASSES = ("letters", "space+letters", "identifier", "whitespace", "punctuation", "digits", "single byte", "other")
CONTEXTS = ("lower|Upper", "letter|letter", "space|word", "digit|digit", "punct|punct", "other")


def token_class(token: str) -> str:
    """The class of one token's text (see CLASSES)."""
    if len(text_to_bytes(token)) == 1:
        return "single byte"
    if token.isspace():
        return "whitespace"
    body = token[1:] if token.startswith(" ") else token
    if body.isalpha():
        return "space+letters" if token.startswith(" ") else "letters"
    if body.isdigit():
        return "digits"
    if body and all(c.isalnum() or c == "_" for c in body):
        return "identifier"
    if body and not any(c.isalnum() or c.isspace() for c in body):
        return "punctuation"
    return "other"


def cut_context(left: str, right: str) -> str:
    """The class of a cut between ASCII characters `left` and `right` (see CONTEXTS; non-ASCII: other).
    GPT-2 pretokens (the GQ-VAE's) never hold letter|digit or an underscore next to a letter."""
    if not (left.isascii() and right.isascii()):
        return "other"
    if left.islower() and right.isupper():
        return "lower|Upper"
    if left.isalpha() and right.isalpha():
        return "letter|letter"
    if left == " " and right.isalnum():
        return "space|word"
    if left.isdigit() and right.isdigit():
        return "digit|digit"
    if not (left.isalnum() or left.isspace() or right.isalnum() or right.isspace()):
        return "punct|punct"
    return "other"


def analyse(pieces: Sequence[str], tokens_of: Sequence[Sequence[str]], top: int) -> dict[str, Any]:
    """Statistics of `tokens_of[i]`, the tokens of pretoken `pieces[i]` (their concatenation)."""
    classes: collections.Counter = collections.Counter()
    strings: collections.Counter = collections.Counter()
    cuts: collections.Counter = collections.Counter()
    chances: collections.Counter = collections.Counter()
    n_tokens = n_bytes = mid = mid_cut = 0
    for piece, tokens in zip(pieces, tokens_of):
        data = text_to_bytes(piece)
        size = len(data)
        n_bytes, n_tokens = n_bytes + size, n_tokens + len(tokens)
        classes.update(map(token_class, tokens))
        strings.update(t for t in tokens if len(text_to_bytes(t)) > 1)
        ends = set(itertools.accumulate(len(text_to_bytes(t)) for t in tokens)) - {size}
        for i in range(1, size):
            context = cut_context(chr(data[i - 1]), chr(data[i]))
            chances[context] += 1
            cuts[context] += i in ends
        if 3 <= size <= 10:
            mid, mid_cut = mid + 1, mid_cut + (len(tokens) > 1)
    return {"bytes_per_token": n_bytes / max(n_tokens, 1), "pretoken_cut_share": mid_cut / max(mid, 1),
            "token_classes": {c: classes[c] / max(n_tokens, 1) for c in CLASSES},
            "cut_rate_by_context": {c: cuts[c] / chances[c] if chances[c] else None for c in CONTEXTS},
            "cut_opportunities": {c: chances[c] for c in CONTEXTS},
            "top_tokens": [[t, n] for t, n in strings.most_common(top)]}

