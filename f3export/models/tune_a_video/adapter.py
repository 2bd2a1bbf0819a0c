"""The Tune-A-Video adapter: its folders and presets, and where its temporal attention is."""

from __future__ import annotations

from ..base import LatentVideoDiffusionAdapter
from ..structure import TemporalSite, TemporalStructure
from .checkpoint import TuneAVideoFolder
from .network import BasicTransformerBlock


class TemporalAttentionBlocks(TemporalStructure):
    """The ``attn_temp`` of every transformer block, fed by its ``norm_temp``."""

    def temporal_sites(self, model):
        return [TemporalSite(f"{name}.attn_temp", f"{name}.norm_temp")
                for name, module in model.named_modules() if isinstance(module, BasicTransformerBlock)]


class TuneAVideoAdapter(LatentVideoDiffusionAdapter):
    family = "tune-a-video"
    checkpoint = TuneAVideoFolder()
    structure = TemporalAttentionBlocks()

    def text_width(self, model):
        return model.config.cross_attention_dim

    def latent_channels(self, model):
        return model.config.in_channels
