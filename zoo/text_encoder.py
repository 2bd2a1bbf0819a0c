"""A small CLIP text encoder with a character-level tokenizer, in diffusers' folder layout.

Trained reference models use it frozen, with their task's words as single tokens and distinct word vectors (the
denoiser learns to read it); tests use it as a real ``text_encoder/`` + ``tokenizer/`` without any download.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT_TOKENS = 77


def byte_alphabet() -> list[str]:
    """GPT-2/CLIP's byte-level alphabet, to write a character-level CLIP vocabulary."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in visible]
    return [chr(c) for c in visible] + [chr(256 + i) for i in range(len(extra))]


def word_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """BPE merges that join each of ``words`` into one token, left to right ("l e", "le f", "lef t</w>")."""
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    return list(dict.fromkeys(merges))


def write_char_clip(folder: Path, width: int, seed: int | None = None, words: tuple[str, ...] = (),
                    max_tokens: int = TEXT_TOKENS, word_vector_scale: float | None = None) -> None:
    """Write ``tokenizer/`` and ``text_encoder/`` (2 layers, 4 heads, ``width`` wide, ``max_tokens`` long) into
    ``folder``. ``seed`` seeds the encoder's weights (None: the global RNG); ``words`` become one token each (a
    task's vocabulary), any other text is read character by character.

    ``word_vector_scale``: None keeps CLIP's initialisation, under which every output position is a blend of
    the caption so far at a small scale. A number draws the token embeddings from N(0, 1), far above the
    position embeddings and the layers' updates, so each position's output is mostly its own word, and scales
    the output by that number: a frozen encoder of distinct word vectors a denoiser can read from its first
    steps (see zoo/README.md, run 8)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = byte_alphabet()
    merges = word_merges(words)
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    vocab = {token: i for i, token in enumerate([*dict.fromkeys(tokens), "<|startoftext|>", "<|endoftext|>"])}
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(str(folder / "tokenizer" / "vocab.json"), str(folder / "tokenizer" / "merges.txt"),
                              model_max_length=max_tokens)
    tokenizer.save_pretrained(folder / "tokenizer")
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_tokens,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"])
    if seed is not None:
        torch.manual_seed(seed)
    encoder = CLIPTextModel(config).eval()
    if word_vector_scale is not None:
        with torch.no_grad():
            encoder.get_input_embeddings().weight.normal_(0.0, 1.0)
            encoder.final_layer_norm.weight.mul_(word_vector_scale)
    encoder.save_pretrained(folder / "text_encoder")
