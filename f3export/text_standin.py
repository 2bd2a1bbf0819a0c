"""The text conditioning of a model folder without a text encoder (the random-weight presets): one seeded
random embedding per prompt. Made with NumPy, so that an engines-only runtime (``f3export generate``) gives a
prompt the embedding the build calibrated and validated with."""

from __future__ import annotations

import hashlib

import numpy as np


def seeded_text_embedding(prompt: str, tokens: int, width: int) -> np.ndarray:
    """[1, tokens, width] float32, N(0, 1), seeded by the prompt's SHA-256."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal((1, tokens, width), dtype=np.float32)


STANDIN_TEXT = "seeded stand-in text"  # how reports name it: prompts the model never read
