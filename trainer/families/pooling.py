"""Where a CLIP text encoder takes its pooled vector: the first end-of-text token, in training, in our pipelines
and in every tool that loads the LoRA.

The published SD/SDXL text-encoder configs keep the legacy ``eos_token_id = 2``, and for that value transformers
pools at ``argmax(input_ids)`` ("the end-of-text token is the highest id"). That stops being true once learnt
tokens are added: ``<s0><s1>`` get ids above ``<|endoftext|>``, so the pooled vector came from ``<s1>``. SDXL
conditions its U-Net on the pooled vector of ``text_encoder_2``; ComfyUI, A1111 / Forge and sd-scripts pool at
the first end-of-text token (sd-scripts: "workaround for CLIP's pooling bug", ``strategy_sdxl._pool_workaround``).
Setting the encoder's ``eos_token_id`` to the tokenizer's real end-of-text id makes transformers take that
position: the same vector those tools compute, at no cost. For prompts without added tokens nothing changes (the
end-of-text token is then the highest id, and ``argmax`` returns its first position, as the padding is either
``<|endoftext|>`` itself or a lower id).

This is the one home of that rule: ``loading.load_parts`` applies it (training, validation samples and class
images all run on those encoders) and the Generate engine applies it to the pipeline it loads; the model card
gives diffusers users the same line.
"""
from __future__ import annotations


def pool_at_end_of_text(text_encoders, tokenizers) -> None:
    """Each CLIP text encoder pools at its tokenizer's first ``<|endoftext|>`` from now on."""
    for encoder, tokenizer in zip(text_encoders, tokenizers):
        eos = tokenizer.eos_token_id
        if eos is None:
            continue
        encoder.config.eos_token_id = eos
        for module in encoder.modules():
            # CLIPTextModel (transformers 5) / CLIPTextTransformer (4.x) copy eos_token_id from the config at init
            if "eos_token_id" in vars(module):
                module.eos_token_id = eos
