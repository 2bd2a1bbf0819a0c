"""The parts of a diffusers pipeline folder besides the denoiser (text encoder, VAE, scheduler), looked up by the
class the folder's own config names, so that a T5 folder is read as T5 and a 3D VAE as a 3D VAE, never as
whatever a family expected. A family declares which classes it accepts (``PipelineParts``); a folder naming
another is refused in one line, before anything runs on it.

Each part is called as the family's diffusers pipeline calls it: prompts tokenized and encoded as
``CogVideoXPipeline`` / ``WanPipeline`` do (padding length, attention mask, Wan's zeroed padding), latents
decoded with the VAE's own latent normalisation, and sampling stepped with the scheduler's own signature.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..artifacts import content_key
from ..errors import CheckpointError
from ..prompts import clean_prompt
from ..weights import read_json
from . import memory

TEXT_ENCODER, TOKENIZER, VAE, SCHEDULER = "text_encoder", "tokenizer", "vae", "scheduler"
MODEL_INDEX = "model_index.json"


def named_class(folder: Path, component: str) -> str | None:
    """The class a pipeline folder names for ``component``: ``model_index.json``'s entry, else the component
    config's ``_class_name`` (diffusers) or ``architectures[0]`` (transformers); None without the component."""
    index = folder / MODEL_INDEX
    if index.is_file():
        entry = read_json(index).get(component)
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
            return entry[1]
    for config in ("config.json", "scheduler_config.json"):
        path = folder / component / config
        if path.is_file():
            data = read_json(path)
            if isinstance(data.get("_class_name"), str):
                return data["_class_name"]
            if isinstance(data.get("architectures"), list) and data["architectures"]:
                return str(data["architectures"][0])
    return None


def refuse(folder: Path, component: str, found: str, accepted: tuple[str, ...], owner: str) -> CheckpointError:
    return CheckpointError(f"{folder / component}: {found} is not a {component} f3export runs with {owner} "
                           f"(it runs {', '.join(accepted)})")


# --- text encoders -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptEncoding:
    """How a family's pipeline turns prompts into embeddings: padded (and truncated) to ``tokens`` (None: the
    tokenizer's ``model_max_length``, at most the encoder's positions, as the CLIP pipelines do); ``masked``:
    the attention mask is passed and the padding positions' embeddings are zeroed (``WanPipeline`` trims each
    prompt's embeddings to its length and pads them back with zeros); ``clean``: the cleaning applied to every
    prompt first (a name in ``prompts.CLEANERS``)."""

    tokens: int | None = None
    masked: bool = False
    clean: str | None = None


class PromptEncoder:
    """A folder's tokenizer and text encoder, called on prompts as the family's pipeline does.

    The tokenizer is loaded at once (small); the encoder on first use, and every prompt's embedding is kept, so
    that a large encoder encodes the recipe's prompts once and is freed (``release``) before the denoiser runs.
    """

    def __init__(self, folder: Path, class_name: str, encoding: PromptEncoding):
        from transformers import AutoTokenizer

        self.folder, self.class_name, self.encoding = folder, class_name, encoding
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder / TOKENIZER, local_files_only=True)
            config = read_json(folder / TEXT_ENCODER / "config.json")
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{folder / TOKENIZER}: cannot load the tokenizer "
                                  f"({str(exc).splitlines()[0]})") from None
        positions = config.get("max_position_embeddings")
        self.tokens = encoding.tokens or min(self.tokenizer.model_max_length, positions or 10**9)
        vocabulary = config.get("vocab_size")
        if vocabulary is not None and len(self.tokenizer) > vocabulary:
            raise CheckpointError(f"{folder / TOKENIZER}: {len(self.tokenizer)} tokens, more than the "
                                  f"{vocabulary} of {folder / TEXT_ENCODER / 'config.json'}")
        self._encoder: nn.Module | None = None
        self._memo: dict[str, torch.Tensor] = {}
        self._disk: tuple[Path, str] | None = None

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def describe(self) -> str:
        return f"{self.class_name} ({self.folder / TEXT_ENCODER}), prompts padded to {self.tokens} tokens"

    @property
    def encoder(self) -> nn.Module:
        if self._encoder is None:
            import transformers

            transformers.utils.logging.disable_progress_bar()  # f3export's own progress is what a log should show
            self._refuse_if_too_large()
            try:
                self._encoder = getattr(transformers, self.class_name).from_pretrained(
                    self.folder / TEXT_ENCODER, local_files_only=True).eval()
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{self.folder / TEXT_ENCODER}: cannot load {self.class_name} "
                                      f"({str(exc).splitlines()[0]})") from None
        return self._encoder

    def _refuse_if_too_large(self) -> None:
        """One line, before loading, where the encoder's weight files alone exceed the memory available."""
        files = [f for f in (self.folder / TEXT_ENCODER).iterdir() if f.suffix in (".safetensors", ".bin")]
        needed, available = sum(f.stat().st_size for f in files), memory.available_memory_bytes()
        if available is not None and needed > available:
            raise CheckpointError(f"{self.folder / TEXT_ENCODER}: its weights alone need {memory.size_text(needed)}, "
                                  f"more than the {memory.size_text(available)} of memory available on this machine")

    def release(self) -> None:
        """Free the encoder (the embeddings already made are kept; a new prompt loads it again)."""
        self._encoder = None

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer([clean_prompt(self.encoding.clean, p) for p in prompts], padding="max_length",
                              max_length=self.tokens, truncation=True, add_special_tokens=True,
                              return_tensors="pt").input_ids

    @torch.no_grad()
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of token ids (what the deployed text encoder computes); the mask is where the ids are not
        padding, as the tokenizer's (T5 pads with a token no text produces)."""
        if not self.encoding.masked:
            return self.encoder(ids)[0]
        mask = (ids != self.pad_token_id).long()
        return self.encoder(ids, attention_mask=mask)[0] * mask[..., None]

    def keep_on_disk(self, folder: Path, files_key: str) -> None:
        """Keep every embedding in ``folder`` too, under a key of the encoder's files (``files_key``), its
        class, its encoding and the prompt: a later stage or build encodes nothing encoded before (a large
        encoder is then not even loaded). A file whose tensor does not hash as its metadata says is encoded
        again."""
        self._disk = (folder, files_key)

    def _disk_path(self, prompt: str) -> Path:
        folder, files_key = self._disk
        key = content_key(files_key, self.class_name, vars(self.encoding), self.tokens, prompt)
        return folder / f"{key}.safetensors"

    def _read(self, prompt: str) -> torch.Tensor | None:
        path = self._disk_path(prompt)
        try:
            with safe_open(path, framework="pt") as stored:
                embedding, recorded = stored.get_tensor(EMBEDDING), stored.metadata().get("sha256")
        except (OSError, ValueError, KeyError, AttributeError, RuntimeError):  # absent or malformed: a miss
            return None
        return embedding if recorded == _tensor_sha256(embedding) else None

    def _write(self, prompt: str, embedding: torch.Tensor) -> None:
        from ..artifacts import atomic_path

        path = self._disk_path(prompt)
        path.parent.mkdir(parents=True, exist_ok=True)
        embedding = embedding.contiguous()
        with atomic_path(path) as tmp:
            save_file({EMBEDDING: embedding}, str(tmp), metadata={"sha256": _tensor_sha256(embedding)})

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._memo))
        if missing and self._disk is not None:
            found = {p: e for p in missing if (e := self._read(p)) is not None}
            self._memo.update(found)
            missing = [p for p in missing if p not in found]
        if missing:
            made = dict(zip(missing, self.embed_ids(self.token_ids(missing)).float()))
            self._memo.update(made)
            for prompt, embedding in made.items() if self._disk is not None else ():
                self._write(prompt, embedding)
        return torch.stack([self._memo[p] for p in prompts])


EMBEDDING = "embedding"


def _tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


# --- VAEs ------------------------------------------------------------------------------------------------------

class VideoAutoencoder:
    """A folder's ``vae/``: latents [B, C, F, h, w] (the denoiser's scale) <-> RGB videos [B, 3, F', H, W] in
    [-1, 1]. ``temporal`` is the latent frames' compression (1: frame by frame; 4: a causal 3D VAE maps
    ``1 + 4k`` frames to ``1 + k`` latent frames)."""

    per_frame: bool = True

    def __init__(self, vae: nn.Module):
        self.vae = vae

    @staticmethod
    def factors(config: dict[str, Any]) -> tuple[int, int]:
        """(temporal, spatial) compression of a VAE of this ``config`` (its config.json): video frames per latent
        frame after the first, and pixels per latent position along height and width (the pipelines'
        ``vae_scale_factor``)."""
        return 1, 2 ** (len(config["block_out_channels"]) - 1)

    @property
    def scale(self) -> int:
        return self.factors(self.vae.config)[1]

    @property
    def temporal(self) -> int:
        return self.factors(self.vae.config)[0]

    def video_frames(self, latent_frames: int) -> int:
        return (latent_frames - 1) * self.temporal + 1

    def to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """The denoiser's latents in the VAE's own scale."""
        return latents / self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, F, h, w] -> RGB frames [B, 3, F', H, W] in [-1, 1]."""
        return _videos(self.decode_frames(_frames(latents)), latents)

    def decode_frames(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents of single frames [N, C, h, w] -> RGB images [N, 3, H, W] in [-1, 1] (what a runtime's VAE
        decoder engine computes)."""
        return self.vae.decode(self.to_vae(latents)).sample.clamp(-1, 1)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """RGB frames [B, 3, F, H, W] in [-1, 1] -> latents [B, C, F, h, w]: the mode of the latent
        distribution (Tune-A-Video draws a sample; the mode makes a source's inversion reproducible)."""
        return _videos(self.vae.encode(_frames(video)).latent_dist.mode() * self.vae.config.scaling_factor, video)


class CausalVideoAutoencoder(VideoAutoencoder):
    """A causal 3D VAE (``AutoencoderKLCogVideoX``): the whole clip decoded at once, frames in groups with the
    VAE's conv cache, as the pipeline's ``decode_latents``; latents scaled by ``scaling_factor``."""

    per_frame = False

    @staticmethod
    def factors(config):
        return int(config.get("temporal_compression_ratio", 4)), 2 ** (len(config["block_out_channels"]) - 1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self.to_vae(latents)).sample.clamp(-1, 1)

    def encode(self, video):
        raise CheckpointError(f"{type(self.vae).__name__}: encoding source videos is not supported")


class WanVideoAutoencoder(CausalVideoAutoencoder):
    """``AutoencoderKLWan``: latents normalised per channel by the config's ``latents_mean`` and
    ``latents_std`` (``WanPipeline``: ``latents * std + mean`` before decoding)."""

    @staticmethod
    def factors(config):
        return int(config.get("scale_factor_temporal") or 4), int(config.get("scale_factor_spatial") or 8)

    def to_vae(self, latents):
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, dtype=latents.dtype).view(shape)
        std = torch.tensor(config.latents_std, dtype=latents.dtype).view(shape)
        return latents / (1.0 / std) + mean  # the pipeline's arithmetic, to its rounding


VAE_CLASSES: dict[str, type[VideoAutoencoder]] = {
    "AutoencoderKL": VideoAutoencoder,
    "AutoencoderKLCogVideoX": CausalVideoAutoencoder,
    "AutoencoderKLWan": WanVideoAutoencoder,
}


def _frames(videos: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [B * F, C, H, W]."""
    return videos.permute(0, 2, 1, 3, 4).flatten(0, 1)


def _videos(frames: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B * F, C, H, W] -> [B, C, F, H, W] with ``like``'s batch and frames."""
    return frames.unflatten(0, like.shape[:1] + like.shape[2:3]).permute(0, 2, 1, 3, 4)


# --- schedulers ------------------------------------------------------------------------------------------------

class DiffusersSampler:
    """A diffusers scheduler driven as its pipeline drives it: ``start(steps, seed)``, then per step
    ``step(output, index, t, latents)``. CogVideoXDPMScheduler's step takes the previous prediction of x0 and the
    previous timestep (``CogVideoXPipeline``), kept here so every loop is the same, and draws noise even at
    eta = 0: from a generator seeded with the run's seed, as the pipeline's ``generator`` when latents are given,
    in the pipeline's latent layout."""

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler
        self.dpm = type(scheduler).__name__ == "CogVideoXDPMScheduler"
        self._previous_x0: torch.Tensor | None = None
        self._generator: torch.Generator | None = None

    @property
    def config(self):
        return self.scheduler.config

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    @property
    def init_noise_sigma(self) -> float:
        """Flow-matching schedulers have none (and no ``scale_model_input``): their noise is N(0, 1) as drawn."""
        return getattr(self.scheduler, "init_noise_sigma", 1.0)

    def start(self, steps: int, seed: int) -> None:
        self.scheduler.set_timesteps(steps)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        self._previous_x0 = None
        self._generator = torch.Generator().manual_seed(seed)

    def scale_model_input(self, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale = getattr(self.scheduler, "scale_model_input", None)
        return sample if scale is None else scale(sample, t)

    def step(self, output: torch.Tensor, index: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        if self.dpm:  # stepped in CogVideoXPipeline's layout [B, F, C, H, W], where its noise is drawn
            back = self.timesteps[index - 1] if index > 0 else None
            latents, self._previous_x0 = self.scheduler.step(
                output.transpose(1, 2), self._previous_x0, t, back, latents.transpose(1, 2), eta=0.0,
                generator=self._generator, return_dict=False)
            return latents.transpose(1, 2)
        return self.scheduler.step(output, t, latents, return_dict=False)[0]


# --- what a family accepts --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PipelineParts:
    """The pipeline parts a family runs: the text encoder classes it accepts and how its pipeline encodes prompts
    with each, the VAE and scheduler classes it accepts, and whether it samples with the folder's scheduler
    class (diffusers' pipelines) or builds its own from the folder's schedule (``schedulers[0]``: Tune-A-Video's
    DDIM from any ``scheduler/``)."""

    # transformers class -> how the family's pipeline encodes prompts with it
    text_encoders: dict[str, PromptEncoding] = field(default_factory=lambda: {"CLIPTextModel": PromptEncoding()})
    vaes: tuple[str, ...] = ("AutoencoderKL",)
    schedulers: tuple[str, ...] = ("DDIMScheduler",)
    folder_scheduler: bool = False

    def text_encoder(self, folder: Path, owner: str) -> PromptEncoder | None:
        if not (folder / TEXT_ENCODER).is_dir():
            return None
        found = named_class(folder, TEXT_ENCODER) or "CLIPTextModel"
        if found not in self.text_encoders:
            raise refuse(folder, TEXT_ENCODER, found, tuple(self.text_encoders), owner)
        return PromptEncoder(folder, found, self.text_encoders[found])

    def vae(self, folder: Path, owner: str) -> VideoAutoencoder | None:
        if not (folder / VAE).is_dir():
            return None
        found = named_class(folder, VAE) or "AutoencoderKL"
        if found not in self.vaes:
            raise refuse(folder, VAE, found, self.vaes, owner)
        import diffusers

        try:
            vae = getattr(diffusers, found).from_pretrained(folder / VAE, local_files_only=True).eval()
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{folder / VAE}: cannot load {found} ({str(exc).splitlines()[0]})") from None
        return VAE_CLASSES[found](vae)

    def vae_factors(self, folder: Path, owner: str) -> tuple[int, int] | None:
        """(temporal, spatial) compression of the folder's VAE, read from its config alone; None without one."""
        if not (folder / VAE / "config.json").is_file():
            return None
        found = named_class(folder, VAE) or "AutoencoderKL"
        if found not in self.vaes:
            raise refuse(folder, VAE, found, self.vaes, owner)
        try:
            return VAE_CLASSES[found].factors(read_json(folder / VAE / "config.json"))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{folder / VAE / 'config.json'}: no compression factors ({found})") from None

    def scheduler_class(self, config: dict[str, Any], where: str, owner: str) -> str:
        """The scheduler class a run uses: the folder's (``config``'s ``_class_name``) where the family's
        pipeline uses the folder's, refused in one line if the family cannot run it; else the family's."""
        found = config.get("_class_name")
        if not self.folder_scheduler or found is None:
            return self.schedulers[0]
        if found not in self.schedulers:
            raise CheckpointError(f"{where}: _class_name {found!r} is not a scheduler f3export runs with {owner} "
                                  f"(it runs {', '.join(self.schedulers)})")
        return found


def load_clip_text_encoder(folder: Path) -> PromptEncoder | None:
    """A folder's CLIP text encoder as Stable Diffusion's pipelines call it (the trained reference models' own)."""
    return PipelineParts().text_encoder(folder, "a CLIP pipeline")
