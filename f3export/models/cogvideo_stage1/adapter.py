"""The CogVideo adapter: where its temporal channels are, and the token sequence layout its runs and exports use."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ...components import Component
from ...errors import RecipeError
from ...recipe import family_key
from ..base import ExportIO, ExportSpec, ModelAdapter, cosine, fidelity_gate
from ..protocols import FramesForward, TokenProtocol, TokenRow
from ..structure import TemporalSite, TemporalStructure
from .checkpoint import SatFolder
from .incremental import CogVideoStep, cache_heads, cache_names, step_axes, step_inputs
from .network import CogVideoConfig, SamplingTerms, TemporalChannelHeads


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
    """The full-sequence graph is training's forward (what calibration and validation measure); the step graph
    (``incremental``) samples as ``cogvideo_pipeline.py`` does, with the [model] sampling settings below."""

    family = "cogvideo"
    option_keys = (
        # cogvideo_pipeline.process_stage1's values: log_text_attention_weights = 1.4 on the scores of text keys
        # (frame 0's session, and later frames' without guidance), frame 0 with enforce_no_swin = True, the later
        # frames' session guided by a second text at alpha 3 (--use-guidance-stage1, --guidance-alpha 3 in
        # scripts/inference_cogvideo_pipeline.sh, which then sets that session's text weight to 0), and its
        # sampling: CogView2's frame 0 at temperature 1, top 16; later frames at --temperature 1.05, --top_k 12
        family_key("model", "log_text_attention_weights", float, 1.4, low=0.0, high=100.0),
        family_key("model", "first_frame_temporal", bool, False),
        family_key("model", "guidance_alpha", float, 3.0, low=0.0, high=100.0),
        family_key("model", "first_frame_top_k", int, 16, low=1),
        family_key("model", "first_frame_temperature", float, 1.0, low=1e-3, high=100.0),
        family_key("model", "top_k", int, 12, low=1),
        family_key("model", "temperature", float, 1.05, low=1e-3, high=100.0),
    )
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

    def __init__(self, log_text_attention_weights: float = 1.4, first_frame_temporal: bool = False,
                 guidance_alpha: float = 3.0, first_frame_top_k: int = 16, first_frame_temperature: float = 1.0,
                 top_k: int = 12, temperature: float = 1.05):
        self.sampling = {"log_text_attention_weights": log_text_attention_weights,
                         "first_frame_temporal": first_frame_temporal, "guidance_alpha": guidance_alpha,
                         "first_frame_top_k": first_frame_top_k, "first_frame_temperature": first_frame_temperature,
                         "top_k": top_k, "temperature": temperature}

    def options(self):
        return dict(self.sampling)

    def sessions(self, max_frames: int, guided: bool) -> list[dict]:
        """``process_stage1``'s two ``my_filling_sequence`` calls, as ``token_sampling.Session``s (JSON): frame 0
        from its own text, then the later frames from the video text with frame 0 given. The cache model adds the
        text weight in the temporal channel only in single-token steps, not in a prefill."""
        weight = self.sampling["log_text_attention_weights"]
        video = 0.0 if guided else weight  # the pipeline's video_log_text_attention_weights
        return [{"first": 0, "stop": 1, "text": "first_frame", "prefill_weights": [weight, 0.0],
                 "step_weights": [weight, weight], "frame0_temporal": self.sampling["first_frame_temporal"]},
                {"first": 1, "stop": max_frames, "text": "video", "prefill_weights": [video, 0.0],
                 "step_weights": [video, video], "frame0_temporal": True}]

    def model_components(self, model, shape):
        """The KV-cache step graph (``incremental``), checked on a cache a prefill made, mid-frame 1."""
        c, weight = model.config, self.sampling["log_text_attention_weights"]

        def inputs(seed: int, known: int, new: int) -> dict[str, torch.Tensor]:
            rows = [seeded_sequence(c, shape.frames, f"step {seed} row {i}", seed * 1000 + i) for i in range(2)]
            return step_inputs(model, torch.stack([t for t, _ in rows]), torch.tensor([n for _, n in rows]),
                               known, new, SamplingTerms(weight, weight, True))

        heads = ", ".join(f"{s}+{t}" for s, t in cache_heads(model))
        meaning = (f"one call of CogVideo's sampling loop: T new tokens after P cached positions -> their image "
                   f"logits and the caches with them appended (contract conventions.step_engine says how to drive "
                   f"it); cached heads per layer, spatial+temporal: {heads}")
        spec = ExportSpec(inputs(7, c.text_len + c.frame_len + 3, 2), ["logits", *cache_names(model, "present")],
                          step_axes(model))
        return [Component("step", CogVideoStep(model).eval(), spec, meaning,
                          inputs(8, c.text_len + c.frame_len + 11, 1))]

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
            "step_engine": self.step_conventions(c),
        }

    def step_conventions(self, c: CogVideoConfig) -> dict:
        """How a runtime samples with the step graphs (``components.step.<variant>``; ``token_sampling``)."""
        s = self.sampling
        return {
            "components": {"original": "step.original", "pruned": "step.pruned"},
            "drive": "per session: a prefill of its context (tokens [B, P0], empty past_* of length 0), then one call "
                     "per new token (tokens [B, 1], past_* = the last call's present_*); position p >= "
                     f"{c.text_len} predicts image token (p - {c.text_len}) mod {c.frame_len} of its frame; a frame "
                     f"block is <start_of_image> ({c.boi_token_id}) then its image tokens but the last",
            "text_weights": "[spatial, temporal]: added to frame tokens' scores on text keys "
                            "(log_text_attention_weights)",
            "frame0_temporal": "false: frame 0's tokens take the spatial channel alone (enforce_no_swin)",
            "text_slots": c.text_len, "frame_len": c.frame_len, "max_frames": c.max_frames,
            "boi_token_id": c.boi_token_id, "pad_token_id": c.pad_token_id,
            "image_vocab_size": c.image_vocab_size, "vocab_size": c.vocab_size,
            "sessions": self.sessions(c.max_frames, guided=False),
            "guided_sessions": self.sessions(c.max_frames, guided=True),
            "guidance": {"alpha": s["guidance_alpha"], "rule": "guide + (logits - guide) x alpha, the guide row "
                         "sampled with the video session's weights and the guide text (the pipeline's "
                         "'<duration>秒<n>视频')"},
            "sampling": {"first_frame": {"top_k": s["first_frame_top_k"], "temperature": s["first_frame_temperature"]},
                         "video": {"top_k": s["top_k"], "temperature": s["temperature"]},
                         "note": "the pipeline's CoglmStrategy draws a cluster of image tokens first (its "
                                 "cluster_label2.npy, not shipped); f3export generate samples the top-k tokens"},
            "pb_relax": "not applied: CogVideoCacheModel computes both channels without it (training's temporal "
                        "channel has alpha = 16, an exact identity in real arithmetic); these engines are fp32",
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
