"""The Tune-A-Video adapter: its presets, folders and temporal sites."""

from __future__ import annotations

from ..base import LatentVideoDiffusionAdapter, ModelBundle, TemporalSite, load_clip_text_encoder, read_scheduler_config
from .checkpoint import load_unet, read_unet_config, unet_files
from .network import BasicTransformerBlock, TuneAVideoConfig, TuneAVideoUNet


TINY = TuneAVideoConfig(
    block_out_channels=[32, 64, 64],
    down_block_types=["CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"],
    up_block_types=["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
    layers_per_block=1,
    cross_attention_dim=32,
    norm_num_groups=8,
    sample_size=16,
)


class TuneAVideoAdapter(LatentVideoDiffusionAdapter):
    family = "tune-a-video"
    presets = {"tiny": TINY.to_dict(), "sd14": TuneAVideoConfig().to_dict()}

    def build(self, config):
        return TuneAVideoUNet(TuneAVideoConfig.from_dict(config, "config"))

    def weights_files(self, folder):
        return unet_files(folder)

    def folder_config(self, folder):
        return read_unet_config(folder)

    def load_folder(self, folder):
        config = self.folder_config(folder)
        return ModelBundle(self.family, load_unet(folder, config), config, f"checkpoint {folder}",
                           random_weights=False, encode_text=load_clip_text_encoder(folder),
                           scheduler_config=read_scheduler_config(folder))

    def temporal_sites(self, model):
        return [
            TemporalSite(f"{name}.attn_temp", f"{name}.norm_temp")
            for name, module in model.named_modules()
            if isinstance(module, BasicTransformerBlock)
        ]

    def text_width(self, model):
        return model.config.cross_attention_dim
