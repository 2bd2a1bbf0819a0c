"""Prompt text as a family's pipeline prepares it before tokenizing, shared by the build (PyTorch) and the
engines-only runtime (no PyTorch), so both give the encoder the same text."""

from __future__ import annotations

import html
import re

def wan_prompt_clean(text: str) -> str:
    """``WanPipeline``'s ``prompt_clean`` (without ftfy, which f3export does not install): HTML entities
    unescaped twice, whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


CLEANERS = {"wan": wan_prompt_clean}  # by the name the engine contract records (text_conditioning.prompt_clean)


def clean_prompt(cleaner: str | None, text: str) -> str:
    return CLEANERS[cleaner](text) if cleaner is not None else text
