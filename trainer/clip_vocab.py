"""The vocabulary of the locally built CLIP-style tokenizers (tiny models, tiny-clip, the toy world): byte-level
BPE with whole-word merges for a list of words, written as ``vocab.json`` + ``merges.txt`` like a Hub tokenizer."""
from __future__ import annotations

import json
import os

# Words that get whole-word BPE merges, so typical prompts stay well under the 77-token limit.
_WORDS = (
    "a photo of the in style and with on at by an for to is man woman person dog cat face portrait "
    "red blue green black white sitting standing wearing shirt hat garden beach city painting drawing "
    "picture close up smiling icon emoji cartoon landscape mountain forest street car house tree sky"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable-unicode table of CLIP/GPT-2 byte-level BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer_files(folder: str, words=None) -> int:
    """Writes vocab.json + merges.txt of a CLIP-style byte-level BPE tokenizer whose ``words`` (default: the tiny
    models' list) get whole-word merges; returns the vocab size."""
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    seen = set(vocab_list)
    for word in (_WORDS if words is None else words):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            a, b = symbols[0], symbols[1]
            merged = a + b
            pair = f"{a} {b}"
            if pair not in merges:
                merges.append(pair)
            if merged not in seen:
                seen.add(merged)
                vocab_list.append(merged)
            symbols = [merged] + symbols[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)
