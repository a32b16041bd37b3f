"""The Train tab's form: a short form first (the knobs people change, with plain labels and the preset's value),
then the other visitor settings in grouped, collapsed expert sections. Only the fields of
``ui/allowlist.py`` :data:`VISITOR_FIELDS` appear; every component has ``elem_id="adv-<field>"``.

Messages about a setting use the form's words (:func:`in_form_words`: "Total steps", not ``--max_train_steps``)
and :func:`mark_fields` outlines the fields an error names (and opens their section).
"""
from __future__ import annotations

import re
from dataclasses import fields
from enum import Enum

import gradio as gr

from trainer import TrainConfig, field_type

from .allowlist import VISITOR_FIELDS

# The short form, in order: field -> plain label.
SHORT_FIELDS = {
    "steps_per_image": "Steps per image",
    "max_train_steps": "Total steps (empty: steps per image × images)",
    "rank": "LoRA rank (capacity)",
    "learning_rate": "Learning rate (image model)",
    "text_encoder_lr": "Learning rate (trigger tokens / text)",
    "resolution": "Resolution in pixels (empty: the model's own)",
    "repeats": "Repeats of each image",
    "train_text_encoder_ti_frac": "Share of steps that train the trigger tokens",
    "with_prior_preservation": "Prior preservation (needs class images)",
    "seed": "Seed",
    "validation_steps": "Sample images every N steps",
}
# Plain labels of the expert fields whose name does not read well.
LABELS = {
    "variant": "Model file variant", "model_family": "Model family", "instance_prompt": "Prompt of uncaptioned images",
    "bucket_step": "Bucket size step (px)", "keep_tokens": "Tags kept in place when shuffling",
    "image_interpolation_mode": "Resize filter", "num_class_images": "Number of class images",
    "train_text_encoder_ti": "Pivotal tuning (learn the trigger tokens)",
    "num_new_tokens_per_abstraction": "New tokens per trigger word",
    "train_text_encoder": "Train the text encoder (LoRA)", "train_text_encoder_frac": "Share of steps for the text encoder",
    "adam_weight_decay_text_encoder": "Weight decay (text)", "lora_alpha": "LoRA alpha", "use_dora": "DoRA",
    "lora_target_modules": "Image-model modules with adapters", "scale_lr": "Scale the learning rate by batch size",
    "use_8bit_adam": "8-bit AdamW", "adam_weight_decay": "Weight decay (image model)",
    "max_grad_norm": "Gradient clipping norm", "lr_scheduler": "Learning-rate schedule",
    "lr_warmup_steps": "Warm-up steps", "lr_num_cycles": "Cycles (cosine with restarts)",
    "lr_power": "Power (polynomial schedule)", "snr_gamma": "Min-SNR gamma", "train_batch_size": "Batch size",
    "gradient_accumulation_steps": "Gradient accumulation", "num_train_epochs": "Epochs (without total steps)",
    "gradient_checkpointing": "Gradient checkpointing (less memory)", "mixed_precision": "Mixed precision",
    "allow_tf32": "TF32 matmuls", "compile_unet": "Compile the image model", "log_every": "Read the loss every N steps",
    "auto_fit": "Fit the run to the GPU first (auto-fit)", "save_precision": "Precision of the LoRA files",
    "checkpointing_steps": "Checkpoint every N steps", "checkpoints_total_limit": "Checkpoints kept",
    "validation_prompt": "Prompt of the sample images", "num_validation_images": "Sample images each time",
    "validation_inference_steps": "Denoising steps of samples", "validation_guidance_scale": "Guidance of samples",
}
GROUP_TITLES = {"model": "Model", "data": "Images and captions", "prior": "Prior preservation",
                "text": "Trigger tokens and text encoder", "lora": "LoRA", "optim": "Optimizer and learning rate",
                "schedule": "Steps, batch and precision", "output": "Checkpoints and sample images",
                "general": "General"}

ADV = [f for f in fields(TrainConfig) if f.name in VISITOR_FIELDS]  # TrainConfig order
ADV_NAMES = [f.name for f in ADV]


def label_of(name: str) -> str:
    """The form's word for a field."""
    return SHORT_FIELDS.get(name) or LABELS.get(name) or name.replace("_", " ").capitalize()


def in_form_words(text: str) -> str:
    """``--max_train_steps`` / `` `max_train_steps` `` in a message -> **Total steps ...** (the form's label)."""
    def sub(m):
        name = m.group(1) or m.group(2)
        return f"**{label_of(name)}**" if name in VISITOR_FIELDS else m.group(0)
    return re.sub(r"`(?:--)?([a-z0-9_]+)`|--([a-z0-9_]+)", sub, text or "")


def fields_named(text: str) -> list[str]:
    """The visitor fields a message names (by field name, flag or form label)."""
    found = [n for n in ADV_NAMES if re.search(rf"(?<![a-z0-9_]){n}(?![a-z0-9_])", text or "")]
    found += [n for n in ADV_NAMES if f"**{label_of(n)}**" in (text or "") and n not in found]
    return found


def make_component(f, value, preset_note: str = ""):
    name, meta = f.name, f.metadata
    t, optional = field_type(name)
    info = in_form_words(meta.get("help") or "")
    if preset_note:
        info = f"{info} {preset_note}".strip()
    kw = dict(label=label_of(name), info=info, elem_id=f"adv-{name}", value=value)
    if t is bool:
        return gr.Checkbox(**kw)
    if isinstance(t, type) and issubclass(t, Enum):
        choices = ([""] if optional else []) + [m.value for m in t]
        return gr.Dropdown(choices=choices, **kw)
    if meta.get("choices"):
        choices = ["" if c is None else c for c in meta["choices"]]
        return gr.Dropdown(choices=choices, **kw)
    if t in (int, float) and optional:
        return gr.Textbox(placeholder="empty = default", **kw)
    if t is int:
        return gr.Number(precision=0, **kw)
    if t is float:
        return gr.Number(**kw)
    return gr.Textbox(**kw)


def preset_note(value) -> str:
    shown = "empty" if value in (None, "") else value
    return f"Preset: {shown}."


def preset_hint(name: str, value) -> str:
    """The info line of a short-form field: its help, then the preset's value."""
    f = next(f for f in ADV if f.name == name)
    return f"{in_form_words(f.metadata.get('help') or '')} {preset_note(value)}".strip()


def build(init: dict) -> tuple[dict, dict]:
    """Draws the short form and the expert sections; returns (field -> component, group -> accordion)."""
    comps: dict = {}
    sections: dict = {}
    with gr.Column(elem_id="ls-train-form"):
        gr.Markdown("**Main settings** (filled by the concept's preset; change what you need)")
        short = [f for f in ADV if f.name in SHORT_FIELDS]
        short.sort(key=lambda f: list(SHORT_FIELDS).index(f.name))
        for i in range(0, len(short), 3):
            with gr.Row():
                for f in short[i:i + 3]:
                    comps[f.name] = make_component(f, init[f.name], preset_note(init[f.name]))
        groups: dict[str, list] = {}
        for f in ADV:
            if f.name not in SHORT_FIELDS:
                groups.setdefault(f.metadata.get("group", "general"), []).append(f)
        with gr.Accordion("Expert settings (everything else, by topic)", open=False, elem_id="ls-advanced") as outer:
            sections["advanced"] = outer
            for g, fs in groups.items():
                with gr.Accordion(GROUP_TITLES.get(g, g.capitalize()), open=False, elem_classes=["ls-expert"],
                                  elem_id=f"ls-expert-{g}") as acc:
                    sections[g] = acc
                    for i in range(0, len(fs), 3):
                        with gr.Row():
                            for f in fs[i:i + 3]:
                                comps[f.name] = make_component(f, init[f.name])
    return comps, sections


def group_of(name: str) -> str:
    return next((f.metadata.get("group", "general") for f in ADV if f.name == name), "general")


def mark_fields(bad: list[str], sections: dict) -> list:
    """Updates for every form field (outlined when in ``bad``) and each section of ``sections`` ("advanced" is
    the expert switch; opened when a bad field is inside), in the order ``ADV_NAMES`` + list(sections)."""
    out = [gr.update(elem_classes=["ls-bad"] if n in bad else []) for n in ADV_NAMES]
    open_groups = {group_of(n) for n in bad if n not in SHORT_FIELDS}
    if open_groups:
        open_groups.add("advanced")
    out += [gr.update(open=True) if g in open_groups else gr.update() for g in sections]
    return out


FORM_CSS = """
.ls-bad {outline: 2px solid var(--color-red-500, #ef4444) !important; border-radius: 8px;}
"""
