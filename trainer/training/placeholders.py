"""Placeholders and the new tokens that replace them: the one home of ``TOK`` -> ``<s0><s1>``.

Used by training (captions, validation prompts), the dataset checks (does a caption contain the trigger?), the
app (trigger renames, Generate prompts), the model card and the Generate engine, so all of them agree on what a
placeholder is: a whole word, case-sensitive, not part of a longer word (``TOKYO`` stays) nor of a learnt token
(``<s0>`` stays).
"""
from __future__ import annotations

import re


def split_abstractions(token_abstraction: str) -> list[str]:
    """'TOK, STY' -> ['TOK', 'STY']."""
    return [a.strip() for a in (token_abstraction or "").split(",") if a.strip()]


def new_tokens(token_abstraction: str, per_abstraction: int) -> dict[str, list[str]]:
    """The one numbering of learnt tokens, shared by training, export and generation:
    'TOK, STY' with 2 each -> {'TOK': ['<s0>', '<s1>'], 'STY': ['<s2>', '<s3>']}."""
    out, i = {}, 0
    for abst in split_abstractions(token_abstraction):
        out[abst] = [f"<s{i + k}>" for k in range(per_abstraction)]
        i += per_abstraction
    return out


def placeholder_pattern(word: str, ignore_case: bool = False) -> "re.Pattern[str]":
    """``word`` as a whole word: not inside a longer word, not inside ``<...>``. A trigger of several words
    matches with any run of spaces between them. ``ignore_case`` matches as a CLIP tokenizer reads plain text
    (it lower-cases); placeholder replacement itself is case-sensitive."""
    body = r"\s+".join(re.escape(w) for w in word.split()) or re.escape(word)
    return re.compile(rf"(?<![\w<]){body}(?![\w>])", re.IGNORECASE if ignore_case else 0)


def contains_placeholder(text: str, word: str, ignore_case: bool = False) -> bool:
    return bool(word and word.strip()) and placeholder_pattern(word, ignore_case).search(text or "") is not None


def replace_word(text: str, word: str, replacement: str) -> str:
    """Every whole-word ``word`` in ``text`` replaced by ``replacement`` (e.g. a trigger rename)."""
    if not word:
        return text
    return placeholder_pattern(word).sub(lambda _m: replacement, text)


def replace_placeholders(text: str, mapping: dict[str, list[str]]) -> str:
    """'a photo of TOK' -> 'a photo of <s0><s1>' (whole words only, so 'TOKYO' stays)."""
    for abst, toks in mapping.items():
        text = replace_word(text, abst, "".join(toks))
    return text
