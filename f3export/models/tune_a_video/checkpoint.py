"""Tune-A-Video checkpoints: diffusers folders, ``unet/config.json`` and
``unet/diffusion_pytorch_model.{safetensors,bin}``, optionally ``text_encoder/``,
``tokenizer/`` and ``scheduler/`` (read by the shared pipeline-folder code); and the presets."""

from __future__ import annotations

from ...artifacts import write_json
from ...weights import find_weights, load_into, load_state_dict, read_json, save_state_dict
from ..loading import PipelineFolder
from .network import TuneAVideoConfig, TuneAVideoUNet

UNET = "unet"

TINY = TuneAVideoConfig(
    block_out_channels=[32, 64, 64],
    down_block_types=["CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"],
    up_block_types=["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
    layers_per_block=1,
    cross_attention_dim=32,
    norm_num_groups=8,
    sample_size=16,
)


class TuneAVideoFolder(PipelineFolder):
    presets = {"tiny": TINY.to_dict(), "sd14": TuneAVideoConfig().to_dict()}

    def build(self, config):
        return TuneAVideoUNet(TuneAVideoConfig.from_dict(config, "config"))

    def weights_files(self, folder):
        """The network's files: its config and its weights."""
        return [folder / UNET / "config.json", find_weights(folder / UNET)]

    def folder_config(self, folder):
        config_path = folder / UNET / "config.json"
        return TuneAVideoConfig.from_dict(read_json(config_path), str(config_path)).to_dict()

    def save_network(self, model, config, folder):
        """``unet/`` as Tune-A-Video's released folders hold it: diffusers' UNet3DConditionModel config."""
        (folder / UNET).mkdir(parents=True, exist_ok=True)
        write_json(folder / UNET / "config.json", {"_class_name": "UNet3DConditionModel", **config})
        save_state_dict(model, folder / UNET / "diffusion_pytorch_model.safetensors")

    def load_folder(self, folder):
        """The UNet of the folder's config with its weights, loaded strictly."""
        config = self.folder_config(folder)
        model = self.build(config).eval()
        weights = find_weights(folder / UNET)
        load_into(model, load_state_dict(weights), weights)
        return self.bundle(folder, model, config)
