"""Put the trigger word into a raw caption according to the kind of concept being trained.

* ``face`` / ``object`` / ``character``: ``"a photo of TOK, <caption>"``
* ``style``: ``"<caption>, in the style of TOK"``
* a custom ``template`` with ``{caption}`` and ``{trigger}`` placeholders overrides both.
"""
from __future__ import annotations

import re
from typing import Optional

from trainer.training.placeholders import contains_placeholder

SUBJECT_CONCEPTS = ("face", "object", "character")
STYLE_CONCEPTS = ("style",)
CONCEPTS = SUBJECT_CONCEPTS + STYLE_CONCEPTS

SUBJECT_TEMPLATE = "a photo of {trigger}, {caption}"
STYLE_TEMPLATE = "{caption}, in the style of {trigger}"

_WS = re.compile(r"\s+")
# What is left dangling around an empty {caption}: "TOK, " / ", TOK" / "TOK - ".
_EDGE_JUNK = " \t\n,;:-–—|"


def normalize_concept(concept: str) -> str:
    """Lower-cased, stripped concept name; ValueError naming the accepted ones when unknown."""
    name = str(concept).strip().lower() if concept is not None else ""
    if name not in CONCEPTS:
        raise ValueError(f"unknown concept {concept!r}; expected one of: {', '.join(CONCEPTS)}")
    return name


def contains_trigger(caption: str, trigger: str) -> bool:
    """True when ``trigger`` appears in ``caption`` as a whole word (not inside a longer word)."""
    return contains_placeholder(caption, trigger)


def _fill(template: str, caption: str, trigger: str) -> str:
    # str.replace rather than str.format: captions and templates may contain other braces.
    text = template.replace("{caption}", caption).replace("{trigger}", trigger)
    text = _WS.sub(" ", text)
    if not caption:
        text = text.strip(_EDGE_JUNK)
        text = re.sub(r"\s+([,;:.])", r"\1", text)  # "TOK , in the style" -> "TOK, in the style"
        text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    return text.strip()


def apply_trigger(
    caption: str,
    concept: str,
    trigger: str = "TOK",
    template: Optional[str] = None,
) -> str:
    """Return the training caption for one image.

    ``caption`` is the raw caption (may be empty). If it already contains ``trigger`` it is returned unchanged.
    ``template`` (a string with ``{caption}`` and/or ``{trigger}``) overrides the concept's default template.
    Raises ``ValueError`` for an unknown ``concept`` or a template without any placeholder.
    """
    kind = normalize_concept(concept)
    caption = "" if caption is None else str(caption)
    trigger = "" if trigger is None else str(trigger).strip()
    if trigger and contains_trigger(caption, trigger):
        return caption
    clean = _WS.sub(" ", caption).strip()

    if template is not None and str(template).strip():
        template = str(template)
        if "{caption}" not in template and "{trigger}" not in template:
            raise ValueError("template must contain a {caption} and/or {trigger} placeholder, got " + repr(template))
        return _fill(template, clean, trigger)

    if not trigger:  # nothing to insert
        return clean

    body = clean.rstrip(" .,;:")
    if kind in STYLE_CONCEPTS:
        return f"{body}, in the style of {trigger}" if body else f"in the style of {trigger}"
    return f"a photo of {trigger}, {body}" if body else f"a photo of {trigger}"
