"""How a prompt calls up what the run learnt, in each tool: the one wording used by the model card and the kohya
metadata (``ss_training_comment``, ``modelspec.trigger_phrase``).

With pivotal tuning the placeholder (``TOK``) was replaced by learnt tokens: diffusers prompts write them
(``<s0><s1>``, after ``load_textual_inversion`` of ``<name>_emb.safetensors``); A1111 / Forge and ComfyUI name
the embedding file instead (``<name>_emb``, ComfyUI ``embedding:<name>_emb``), which inserts all of its vectors.
Without pivotal tuning the placeholder word itself is the trigger in every tool.
"""
from __future__ import annotations

from .embeddings import embeddings_file_name


def diffusers_trigger(cfg) -> str:
    """``<s0><s1>`` (all learnt tokens, in order), or the placeholder word(s) without pivotal tuning."""
    if cfg.train_text_encoder_ti:
        return "".join(t for a in cfg.abstractions for t in cfg.tokens_per_abstraction[a])
    return " ".join(cfg.abstractions)


def embedding_name(cfg) -> str:
    """The name A1111 and ComfyUI prompts use for the learnt embeddings: the file's stem, ``<name>_emb``."""
    return embeddings_file_name(cfg)[: -len(".safetensors")]


def trigger_comment(cfg) -> str:
    """One line naming the whole trigger and its spelling in each tool."""
    if not cfg.train_text_encoder_ti:
        return f"trigger: {diffusers_trigger(cfg)} (write it in the prompt, in every tool)"
    per = "; ".join(f"{a} -> {''.join(cfg.tokens_per_abstraction[a])}" for a in cfg.abstractions)
    name = embedding_name(cfg)
    return (f"trigger: {diffusers_trigger(cfg)} in diffusers (load {name}.safetensors with load_textual_inversion); "
            f"{name} in A1111 / Forge, embedding:{name} in ComfyUI (embedding file {name}.safetensors). "
            f"Placeholders: {per}")
