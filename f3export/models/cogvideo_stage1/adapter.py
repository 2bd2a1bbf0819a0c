"""The CogVideo adapter: where its temporal channels are, and the token sequence layout its runs and exports use."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ...errors import RecipeError
from ..base import ExportIO, ModelAdapter, cosine, fidelity_gate
from ..protocols import FramesForward, TokenProtocol, TokenRow
from ..structure import TemporalSite, TemporalStructure
from .checkpoint import SatFolder
from .network import CogVideoConfig, TemporalChannelHeads


def seeded_sequence(config: CogVideoConfig, frames: int, prompt: str, seed: int) -> tuple[torch.Tensor, int]:
    """CogVideo's input layout with stand-in ids, when no real tokens are given: (tokens [S], text length).

    The prompt seeds a text of 1..text_len tokens, left-padded; the seed the image tokens of every frame block,
    which starts with BOI.
    """
    c = config
    text_rng = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little"))
    text_len = int(torch.randint(1, c.text_len + 1, (), generator=text_rng))
    text_ids = torch.arange(c.image_vocab_size, c.vocab_size)
    text_ids = text_ids[(text_ids != c.boi_token_id) & (text_ids != c.pad_token_id)]
    text = text_ids[torch.randint(len(text_ids), (text_len,), generator=text_rng)]
    image_rng = torch.Generator().manual_seed(seed)
    images = torch.randint(0, c.image_vocab_size, (frames, c.frame_len - 1), generator=image_rng)
    blocks = torch.cat([torch.full((frames, 1), c.boi_token_id), images], dim=1)
    return torch.cat([torch.full((c.text_len - text_len,), c.pad_token_id), text, blocks.flatten()]), text_len


def read_sequence(config: CogVideoConfig, frames: int, tokens: np.ndarray, source: str) -> tuple[torch.Tensor, int]:
    """A token file's row, checked against CogVideo's layout: (tokens [S], text length after the leading pads)."""
    c = config
    length = c.text_len + frames * c.frame_len
    if len(tokens) != length:
        raise RecipeError(f"{source}: {len(tokens)} tokens, but the recipe's shape ({frames} frames) needs {length}")
    if tokens.min() < 0 or tokens.max() >= c.vocab_size:
        raise RecipeError(f"{source}: token ids must lie in [0, {c.vocab_size})")
    pads = tokens[:c.text_len] == c.pad_token_id
    leading = c.text_len if pads.all() else int(pads.argmin())
    if pads[leading:].any():
        raise RecipeError(f"{source}: <pad> ({c.pad_token_id}) at position {leading + int(pads[leading:].argmax())}, "
                          "after the text began: CogVideo's text is left-padded")
    blocks = tokens[c.text_len:].reshape(frames, c.frame_len)
    without_boi = np.flatnonzero(blocks[:, 0] != c.boi_token_id)
    if without_boi.size:
        frame = without_boi[0]
        raise RecipeError(f"{source}: position {c.text_len + frame * c.frame_len} (frame {frame}'s first) holds "
                          f"{blocks[frame, 0]}, not <start_of_image> ({c.boi_token_id}), which begins every frame")
    not_image = np.argwhere(blocks[:, 1:] >= c.image_vocab_size)
    if not_image.size:
        frame, index = not_image[0]
        raise RecipeError(f"{source}: position {c.text_len + frame * c.frame_len + 1 + index} holds "
                          f"{blocks[frame, 1 + index]}, not an image token (< {c.image_vocab_size})")
    return torch.from_numpy(tokens), c.text_len - leading


class TemporalChannels(TemporalStructure):
    """The temporal channel of every layer (``TemporalChannelHeads``); its norm is the layer's input norm,
    which the spatial channel reads too."""

    def temporal_sites(self, model):
        return [TemporalSite(f"transformer.layers.{i}.temporal", f"transformer.layers.{i}.input_layernorm",
                             shared_norm=True, access=TemporalChannelHeads)
                for i in range(model.config.num_layers)]


class CogVideoAdapter(ModelAdapter):
    family = "cogvideo"
    checkpoint = SatFolder()
    structure = TemporalChannels()
    # The masks and position ids are fixed by the sequence layout; only the batch may vary.
    fixed_axes = ("frames", "height", "width")
    protocol = TokenProtocol()
    io = ExportIO(inputs={"tokens": {0: "batch"}, "text_len": {0: "batch"}}, outputs={"logits": {0: "batch"}})
    fidelity_gates = (fidelity_gate("logit_cosine", "pruning_min_logit_cosine", 0.9, low=-1.0, high=1.0),  # per frame
                      fidelity_gate("top1_agreement", "pruning_min_top1_agreement", 0.5, low=0.0, high=1.0))
    calibration_note = ("temporal statistics over the tokens of frames 1 on: CogVideo's stage 1 masks frame 0 "
                        "out of its loss and generates it with the temporal channel off")

    def shape_error(self, model, shape):
        c = model.config
        if (shape.latent_height, shape.latent_width) != (c.frame_resolution, c.frame_resolution):
            return (f"latent_height/latent_width = {shape.latent_height}x{shape.latent_width}, but CogVideo frames "
                    f"are {c.frame_resolution}x{c.frame_resolution} image tokens")
        if shape.frames > c.max_frames:
            return f"frames = {shape.frames}, but the model's layout holds at most {c.max_frames} frames"
        if shape.frames < 2:
            return (f"frames = {shape.frames}, but CogVideo's temporal channel acts from frame 1 on (stage 1 "
                    "generates frame 0 without it): at least 2 frames")
        return None

    def conventions(self, bundle):
        c = CogVideoConfig.from_dict(bundle.config, "config")
        return {
            "kind": "autoregressive token transformer: logits = model(tokens, text_len), one full-sequence forward "
                    "(teacher forcing, as CogVideo trains)",
            "tokens": f"int64 [batch, {c.text_len} + frames x {c.frame_len}]: the text left-padded to {c.text_len} "
                      f"slots (text ids >= {c.image_vocab_size}; the pad slots' ids are ignored), then per frame a "
                      f"block of {c.frame_len}: <start_of_image> ({c.boi_token_id}) followed by the frame's image "
                      f"tokens 0..{c.frame_len - 2} (ids < {c.image_vocab_size}, "
                      f"{c.frame_resolution}x{c.frame_resolution} row by row); its last token is never an input",
            "text_len": f"int64 [batch]: the real text length L (0..{c.text_len}); the first {c.text_len} - L slots "
                        "are pads, masked out of both attention channels, position id 0; the text takes 0..L-1, "
                        f"frame tokens {c.frame_position_offset} on",
            "logits": f"float32 [batch, frames x {c.frame_len}, {c.image_vocab_size}]: row j is position "
                      f"{c.text_len} + j's prediction of image token j (frame j // {c.frame_len}, token "
                      f"j % {c.frame_len}), over the image vocabulary only; causal masks: each row sees its prefix",
            "frame_0": "stage 1 generates frame 0 with the temporal channel off; calibration and pruning fidelity "
                       "read frames 1 on",
            "layout": list(c.layout), "vocab_size": c.vocab_size, "image_vocab_size": c.image_vocab_size,
            "boi_token_id": c.boi_token_id, "pad_token_id": c.pad_token_id,
        }

    def example_inputs(self, model, shape, batch, seed):
        rows = [seeded_sequence(model.config, shape.frames, f"export {seed} row {i}", seed * 1000 + i)
                for i in range(batch)]
        return {"tokens": torch.stack([tokens for tokens, _ in rows]),
                "text_len": torch.tensor([text_len for _, text_len in rows])}

    @torch.no_grad()
    def trajectory(self, bundle, model, run, shape, on_step=None):
        config = model.config
        if isinstance(run, TokenRow):
            tokens, text_len = read_sequence(config, shape.frames, run.tokens, run.source)
        else:
            tokens, text_len = seeded_sequence(config, shape.frames, run.prompt, run.seed)
        if on_step is not None:
            on_step(0)
        logits = model(tokens[None], torch.tensor([text_len]))
        return FramesForward([0], list(logits.split(config.frame_len, dim=1)))

    def fidelity(self, reference, candidate):
        """Image-vocabulary logits of frames 1 on (stage 1 generates frame 0 with the temporal channel off)."""
        frames, reference_frames = candidate.frame_logits[1:], reference.frame_logits[1:]
        same = torch.cat(frames, dim=1).argmax(-1) == torch.cat(reference_frames, dim=1).argmax(-1)
        return {"logit_cosine": [cosine(c, r) for c, r in zip(frames, reference_frames)],
                "top1_agreement": same.double().mean().item()}
