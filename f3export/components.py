"""The rest of a text-to-video pipeline, for a runtime without PyTorch: the model folder's text encoder (CLIP,
T5, UMT5) and VAE decoder, exported beside the denoiser, built as engines and checked against PyTorch.

    text_encoder:  input_ids [batch, tokens] int64            -> text_embeddings [batch, tokens, width]
                   (where the family's pipeline masks padding, the mask is the ids that are not padding, and
                   the padding positions' embeddings are zeroed inside the graph)
    vae_decoder:   latents [frames, channels, h, w] (as the denoiser leaves them)
                                                              -> frames [frames, 3, H, W] in [-1, 1]
                   a causal 3D VAE (CogVideoX, Wan): the whole clip, latents [1, channels, F, h, w] -> frames
                   [1, 3, F', H, W], F' = (F - 1) x its temporal compression + 1; F is the build's latent frames,
                   fixed (it decodes frame groups with a conv cache, traced for that count)

The tokenizer goes with them as ``tokenizer.json`` (Hugging Face ``tokenizers``, which needs no PyTorch), with
the padding and truncation the build's text encoder used. A model folder without them (a preset, a
pixel-space model without ``vae/``) has none: its runtime uses the seeded stand-in embedding, and frames are
its output or a picture of its latents (``generate``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .models.base import ExportSpec, VideoShape
from .models.loading import ModelBundle
from .models.pipeline_parts import PromptEncoder, VideoAutoencoder

TOKENIZER_FILE = "tokenizer.json"


class TextEncoderNet(nn.Module):
    """input_ids -> the embeddings the denoiser cross-attends to: ``PromptEncoder.embed_ids``."""

    def __init__(self, text: PromptEncoder):
        super().__init__()
        self.encoder = text.encoder  # a submodule, so that the exporter sees its weights
        self.text = text

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text.embed_ids(input_ids)


class VaeDecoderNet(nn.Module):
    """Latents (the sampler's scale) -> RGB frames in [-1, 1]: ``VideoAutoencoder.decode_frames``."""

    def __init__(self, autoencoder: VideoAutoencoder):
        super().__init__()
        self.vae = autoencoder.vae  # a submodule, so that the exporter sees its weights
        self.autoencoder = autoencoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode_frames(latents)


class VideoDecoderNet(VaeDecoderNet):
    """Latents of a whole clip [B, C, F, h, w] -> RGB video [B, 3, F', H, W] in [-1, 1]:
    ``VideoAutoencoder.decode`` (a causal 3D VAE decodes the clip at once)."""

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents)


def exportable(module: nn.Module) -> nn.Module:
    """``module``, or a copy the TorchScript exporter can trace computing the same: nearest-exact upsampling
    (Wan's VAE), which it has no symbolic for, equals nearest at the integer scale factors used here (the copy's
    engine is validated against ``module`` itself)."""
    upsamplers = [m for m in module.modules() if isinstance(m, nn.Upsample) and m.mode == "nearest-exact"]
    if not upsamplers:
        return module
    if any(m.scale_factor is None or any(float(f) != int(f) for f in torch.as_tensor(m.scale_factor).flatten())
           for m in upsamplers):
        raise ValueError("nearest-exact upsampling by a non-integer factor cannot be exported")
    copied = copy.deepcopy(module)
    for m in copied.modules():
        if isinstance(m, nn.Upsample) and m.mode == "nearest-exact":
            m.mode = "nearest"
    return copied


@dataclass(frozen=True)
class Component:
    name: str
    module: nn.Module
    spec: ExportSpec
    meaning: str
    check_inputs: dict[str, torch.Tensor]  # others than the export's, for validation


def pipeline_components(bundle: ModelBundle, shape: VideoShape, latent_channels: int) -> list[Component]:
    """The folder's text encoder and VAE decoder as exportable modules, with example inputs."""
    components = []
    text = bundle.encode_text
    if text is not None:
        ids = text.token_ids(["a video of a dog", ""])
        components.append(Component("text_encoder", TextEncoderNet(text).eval(), ExportSpec(
            {"input_ids": ids}, ["text_embeddings"], {"input_ids": {0: "batch"}, "text_embeddings": {0: "batch"}}),
            f"{text.class_name} token ids padded to {text.tokens} (tokenizer.json) -> the denoiser's "
            "encoder_hidden_states",
            {"input_ids": text.token_ids(["a man is skiing down a snowy slope at dusk", "a cat", ""])}))
    if bundle.vae is not None and bundle.vae.per_frame:
        def latents(seed: int) -> torch.Tensor:
            return torch.randn((shape.frames, latent_channels, shape.latent_height, shape.latent_width),
                               generator=torch.Generator().manual_seed(seed))

        components.append(Component("vae_decoder", VaeDecoderNet(bundle.vae).eval(), ExportSpec(
            {"latents": latents(5)}, ["frames"], {"latents": {0: "frames"}, "frames": {0: "frames"}}),
            "the final latents, frame by frame ([frames, channels, h, w]) -> RGB frames in [-1, 1]",
            {"latents": latents(6)}))
    elif bundle.vae is not None:
        def clip(seed: int) -> torch.Tensor:
            return torch.randn((1, latent_channels, shape.frames, shape.latent_height, shape.latent_width),
                               generator=torch.Generator().manual_seed(seed))

        components.append(Component("vae_decoder", VideoDecoderNet(bundle.vae).eval(), ExportSpec(
            {"latents": clip(5)}, ["frames"], {}),
            f"the final latents of a clip ([1, channels, {shape.frames}, h, w]: exactly {shape.frames} latent "
            f"frames) -> its {bundle.vae.video_frames(shape.frames)} RGB frames [1, 3, frames, H, W] in [-1, 1] "
            f"({type(bundle.vae.vae).__name__})", {"latents": clip(6)}))
    return components


def write_tokenizer(text: PromptEncoder, path: Path) -> Path:
    """The build's tokenizer as one ``tokenizers`` file, padding and truncation to the encoder's length set in
    it, so a runtime tokenizes as the build did with ``Tokenizer.from_file`` alone."""
    from tokenizers import Tokenizer

    from .artifacts import atomic_path

    fast = text.tokenizer
    backend = Tokenizer.from_str(fast.backend_tokenizer.to_str())  # a copy: the build's own stays as loaded
    backend.enable_truncation(max_length=text.tokens)
    backend.enable_padding(length=text.tokens, pad_id=fast.pad_token_id, pad_token=fast.pad_token)
    with atomic_path(path) as tmp:
        tmp.write_text(backend.to_str())
    return path
