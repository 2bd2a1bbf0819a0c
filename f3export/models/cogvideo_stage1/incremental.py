"""CogVideo as it samples: one graph that runs new tokens against a key/value cache of both channels.

``cogvideo_pipeline.py`` generates a frame's 400 image tokens one at a time with ``CogVideoCacheModel``: a
prefill of the given context (the text, and for frames 1 on frame 0's block), then one forward per token over
the cached keys and values of every layer's spatial channel (``memkv0``) and temporal channel (``memkv1``).
``CogVideoStep`` is that forward for T new tokens after P cached positions (T = the context for the prefill,
P = 0; T = 1 for a step), in the training layout of ``network`` (the text left-padded to ``text_len`` slots,
its pads masked: they get exactly zero attention, so a padded prompt equals the pipeline's unpadded one):

    inputs   tokens [B, T] int64, text_len [B] int64 (real text tokens, as ``CogVideoModel``),
             text_weights [2] float32 (the text weight of the spatial and the temporal channel),
             frame0_temporal [1] bool (False: frame 0 takes the spatial channel alone),
             past_spatial_<l> [B, 2, heads, P, d] (keys, values), past_temporal_<l> [B, 2, kept heads, P, d]
    outputs  logits [B, T, image vocabulary] (position p's prediction, as the full forward's row p - text_len),
             present_spatial_<l>, present_temporal_<l>: the caches with the new tokens' keys and values appended

A layer whose temporal heads are all pruned has no temporal cache; a pruned layer's holds its kept heads only.
Equal, position by position, to ``CogVideoModel.logits`` over the whole sequence under the same terms.
"""

from __future__ import annotations

import torch
from torch import nn

from .network import (CogVideoModel, RemovedTemporalChannel, SamplingTerms, frame_of, spatial_allowed,
                      temporal_allowed, text_bias)


def cache_heads(model: CogVideoModel) -> list[tuple[int, int]]:
    """(spatial heads, temporal heads) cached per layer; 0 temporal heads: that layer keeps no temporal cache."""
    return [(layer.attention.heads, 0 if isinstance(layer.temporal, RemovedTemporalChannel) else layer.temporal.heads)
            for layer in model.transformer.layers]


def cache_names(model: CogVideoModel, kind: str) -> list[str]:
    """The graph's cache tensors in order (``kind``: "past" or "present"): per layer, spatial then temporal."""
    names = []
    for index, (_, temporal) in enumerate(cache_heads(model)):
        names.append(f"{kind}_spatial_{index}")
        if temporal:
            names.append(f"{kind}_temporal_{index}")
    return names


def empty_cache(model: CogVideoModel, batch: int) -> list[torch.Tensor]:
    """The caches of no position (P = 0), for a prefill."""
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    return [torch.zeros(batch, 2, heads, 0, head_dim) for spatial, temporal in cache_heads(model)
            for heads in (spatial, temporal) if heads]


class CogVideoStep(nn.Module):
    """(tokens, text_len, text_weights, frame0_temporal, *past) -> (logits, *present); see the module's docstring."""

    def __init__(self, model: CogVideoModel):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, text_len: torch.Tensor, text_weights: torch.Tensor,
                frame0_temporal: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model, c = self.model, self.model.config
        known = past[0].shape[3]
        queries = known + torch.arange(tokens.shape[1])
        keys = torch.arange(known + tokens.shape[1])
        real = keys[None, :] >= (c.text_len - text_len)[:, None]  # [B, K]: pads are never attended
        spatial_mask = spatial_allowed(queries, keys, c.text_len, c.frame_len)[None, None] & real[:, None, None, :]
        temporal_mask = temporal_allowed(queries, keys, c.text_len)[None, None] & real[:, None, None, :]
        spatial_bias = text_bias(queries, keys, c.text_len, text_weights[0])
        temporal_bias = text_bias(queries, keys, c.text_len, text_weights[1])
        frame = frame_of(queries, c.text_len, c.frame_len)
        # Frame rows mix both channels, but frame 0's when the temporal channel is off; text rows: spatial only.
        mixed_rows = ((frame > 0) | ((frame == 0) & frame0_temporal))[None, :, None]

        x = model.embed(tokens) + model.position_embeddings_at(text_len, queries)
        caches, present = iter(past), []
        for layer in model.transformer.layers:
            h = layer.input_layernorm(x)
            spatial, spatial_present = layer.attention.step(h, next(caches), spatial_mask, spatial_bias)
            temporal_past = None if isinstance(layer.temporal, RemovedTemporalChannel) else next(caches)
            temporal, temporal_present = layer.temporal.step(h, temporal_past, temporal_mask, temporal_bias)
            mixed = spatial * layer.temporal.spatial_weight() + temporal
            x = layer.feed_forward(x, torch.where(mixed_rows, mixed, spatial))
            present += [spatial_present] + ([temporal_present] if temporal_present is not None else [])
        return (model.image_logits(x), *present)

    def run(self, tokens: torch.Tensor, text_len: torch.Tensor, terms: SamplingTerms,
            past: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One call with Python values: (logits, present); no ``past``: a prefill."""
        outputs = self(tokens, text_len, *terms_inputs(terms),
                       *(past if past is not None else empty_cache(self.model, tokens.shape[0])))
        return outputs[0], list(outputs[1:])


def terms_inputs(terms: SamplingTerms) -> tuple[torch.Tensor, torch.Tensor]:
    """The graph's ``text_weights`` [2] and ``frame0_temporal`` [1] of ``terms``."""
    return (torch.tensor([terms.spatial_text_weight, terms.temporal_text_weight], dtype=torch.float32),
            torch.tensor([bool(terms.frame0_temporal)]))


def step_inputs(model: CogVideoModel, tokens: torch.Tensor, text_len: torch.Tensor, known: int, new: int,
                terms: SamplingTerms) -> dict[str, torch.Tensor]:
    """The step graph's named inputs for positions ``known``..``known + new - 1`` of the rows ``tokens``, the cache
    made by a prefill of the first ``known`` positions (so a check sees the caches a run would)."""
    with torch.no_grad():
        past = CogVideoStep(model).run(tokens[:, :known], text_len, terms)[1] if known else \
            empty_cache(model, len(tokens))
    weights, frame0_temporal = terms_inputs(terms)
    return {"tokens": tokens[:, known:known + new], "text_len": text_len, "text_weights": weights,
            "frame0_temporal": frame0_temporal, **dict(zip(cache_names(model, "past"), past))}


def step_axes(model: CogVideoModel) -> dict[str, dict[int, str]]:
    """Dynamic axes of the step graph: the batch, the new tokens, the cached and the updated lengths."""
    axes = {"tokens": {0: "batch", 1: "new_tokens"}, "text_len": {0: "batch"}, "logits": {0: "batch", 1: "new_tokens"}}
    axes.update({name: {0: "batch", 3: "past_length"} for name in cache_names(model, "past")})
    axes.update({name: {0: "batch", 3: "total_length"} for name in cache_names(model, "present")})
    return axes
