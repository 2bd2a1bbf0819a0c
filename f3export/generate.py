"""``f3export generate``: a video from a build's engines alone, with no PyTorch in the process.

Text -> embeddings -> the DDIM loop with classifier-free guidance (the scheduler config recorded in the
build's contract) -> frames -> an animated image. The text conditioning is what the build calibrated with: the
build's text encoder engine on the tokens of its ``tokenizer.json`` (``components``), or the seeded stand-in
of a model folder without a text encoder (``text_standin``). Frames: the build's VAE decoder engine on the
final latents; else a pixel-space model's output as is; else latents shown as their first three channels,
each scaled to [-1, 1] over the clip (a picture of the latents, stated in the caption line). The initial noise is NumPy's from ``seed``:
the same seed gives the same video here, not the PyTorch sampler's video of that seed.

With ``compare``, the same prompt and noise run through the original engine too, and the file shows original
(left) and pruned (right) side by side, with the PSNR between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifacts import atomic_path, open_build
from .engines import make_backend
from .errors import CheckError, RecipeError
from .runtime import EngineRunner
from .scheduling import DDIM
from .text_standin import seeded_text_embedding
from .videos import FRAME_MILLISECONDS, uint8_frames

STANDIN = "seeded stand-in"
FORMATS = {".gif": "GIF", ".webp": "WEBP", ".png": "PNG"}  # animated images Pillow writes without ffmpeg


@dataclass(frozen=True)
class Clip:
    video: np.ndarray  # [3, F, H, W] in [-1, 1]
    latents: np.ndarray  # the final latents [1, C, F, h, w]
    shown_as: str  # how frames were made from the model's output


class EnginePipeline:
    """The denoising loop of a finished build on its engines (``variant``: "pruned" or "original")."""

    def __init__(self, root: Path, variants: tuple[str, ...] = ("pruned",)):
        build = open_build(root, runtime=True)
        contract = build.doc["contract"]
        conventions = contract.get("conventions", {})
        where = f"{root / 'manifest.json'}: contract.conventions"
        scheduler, text = conventions.get("scheduler"), conventions.get("text_conditioning")
        if not isinstance(scheduler, dict) or "guidance" not in conventions:
            raise CheckError(f"{where}: not a diffusion model's contract (no scheduler and guidance); generate "
                             "runs text-to-video denoisers")
        if scheduler.get("class") != "DDIMScheduler":
            raise CheckError(f"{where}.scheduler.class = {scheduler.get('class')!r}: the engines-only sampler is "
                             "DDIM (DDIMScheduler)")
        if not isinstance(text, dict):
            raise CheckError(f"{where}.text_conditioning: missing (a build from before f3export generate; "
                             "rebuild it)")
        components = build.doc.get("components") or {}
        if not isinstance(components, dict):
            raise CheckError(f"{root / 'manifest.json'}: components: expected a table")
        self.text_encoder = self.tokenizer = self.decoder = None
        onnxruntime = make_backend("onnxruntime", build.recipe, build.root)  # the components' engines
        if not str(text.get("source", "")).startswith(STANDIN):
            if "text_encoder" not in components:
                raise CheckError(f"{where}.text_conditioning: this model's prompts go through its text encoder, and "
                                 "this build has no text encoder engine to run it without PyTorch")
            from tokenizers import Tokenizer

            entry = components["text_encoder"]
            self.tokenizer = Tokenizer.from_file(str(build.verified_file(
                entry.get("tokenizer"), "export", "components.text_encoder.tokenizer")))
            self.text_encoder = onnxruntime.load(build.component_engine("text_encoder"))
        if "vae_decoder" in components:
            self.decoder = onnxruntime.load(build.component_engine("vae_decoder"))
        try:  # the manifest is untrusted input: a malformed field is one line, not a traceback
            self.scheduler_config = dict(scheduler["config"])
            DDIM(self.scheduler_config)
            self.noise_channels = int(conventions["output"]["noise_channels"][1])
            sample = next(t for t in contract["inputs"] if t["name"] == "sample")
            self.channels = int(sample["shape"][1])
            self.standin = (int(text["tokens"]), int(text["width"]))  # [tokens, width] of the stand-in
        except (KeyError, TypeError, IndexError, ValueError, StopIteration):
            raise CheckError(f"{where}: malformed (scheduler config, text conditioning, output noise channels or "
                             "the sample input)") from None
        model = build.recipe.model
        self.frames, self.height, self.width = model.frames, model.latent_height, model.latent_width
        self.validation = _sampling_defaults(build.doc["recipe"].get("validation"), root)
        self.engines = {variant: EngineRunner(root, variant) for variant in variants}

    def embed(self, prompt: str) -> np.ndarray:
        """[1, tokens, width]: the build's text encoder engine on the prompt's tokens, else the seeded stand-in."""
        if self.text_encoder is None:
            return seeded_text_embedding(prompt, *self.standin)
        ids = np.asarray([self.tokenizer.encode(prompt).ids], dtype=np.int64)
        return self.text_encoder.run({"input_ids": ids})["text_embeddings"]

    def sample(self, variant: str, prompt: str, seed: int, steps: int, guidance_scale: float,
               on_step=None) -> Clip:
        engine = self.engines[variant]
        context = np.concatenate([self.embed(""), self.embed(prompt)])
        scheduler = DDIM(self.scheduler_config)
        scheduler.set_timesteps(steps)
        latents = np.random.default_rng(seed).standard_normal(
            (1, self.channels, self.frames, self.height, self.width), dtype=np.float32)
        for i, t in enumerate(scheduler.timesteps):
            noise = engine(sample=np.concatenate([latents, latents]), timestep=np.float32(t),
                           encoder_hidden_states=context)[:, :self.noise_channels]
            uncond, cond = noise[:1], noise[1:]
            latents = scheduler.step(uncond + guidance_scale * (cond - uncond), int(t), latents)
            if on_step is not None:
                on_step(i)
        return self._frames(latents)

    def _frames(self, latents: np.ndarray) -> Clip:
        if self.decoder is not None:
            frames = self.decoder.run({"latents": np.ascontiguousarray(latents[0].transpose(1, 0, 2, 3))})["frames"]
            return Clip(frames.transpose(1, 0, 2, 3), latents, "frames decoded by the build's VAE decoder engine")
        if self.channels == 3:
            return Clip(latents[0], latents, "RGB frames (a pixel-space model)")
        shown = latents[0, :3]
        low = shown.min(axis=(1, 2, 3), keepdims=True)
        high = shown.max(axis=(1, 2, 3), keepdims=True)
        return Clip((shown - low) / np.maximum(high - low, 1e-12) * 2 - 1, latents,
                    "latent channels 0-2, each scaled over the clip (no VAE decoder in this build)")


def _sampling_defaults(section, root: Path) -> dict[str, float]:
    """The build's held-out sampling settings (steps, guidance), the defaults of generation."""
    section = section if isinstance(section, dict) else {}
    steps, guidance = section.get("steps"), section.get("guidance_scale")
    if not (isinstance(steps, int) and 1 <= steps <= 1000 and isinstance(guidance, (int, float)) and guidance >= 0):
        raise CheckError(f"{root / 'manifest.json'}: recipe.validation steps / guidance_scale missing or malformed")
    return {"steps": steps, "guidance_scale": float(guidance)}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two videos in [-1, 1] (peak-to-peak 2)."""
    mse = float(np.mean((np.clip(a, -1, 1) - np.clip(b, -1, 1)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4 / mse)


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 2) -> np.ndarray:
    """Two videos [3, F, H, W] next to each other along the width, a white gap between them."""
    spacer = np.ones(left.shape[:3] + (gap,), dtype=left.dtype)
    return np.concatenate([left, spacer, right], axis=3)


def animation_format(path: Path) -> str:
    """Pillow's format for an animated image file named ``path``; RecipeError for any other suffix."""
    form = FORMATS.get(path.suffix.lower())
    if form is None:
        raise RecipeError(f"{path}: write {', '.join(FORMATS)} (MP4 needs ffmpeg, which f3export does not depend on)")
    return form


def write_animation(path: Path, video: np.ndarray, scale: int = 1) -> None:
    """``video`` ([3, F, H, W] in [-1, 1]) as a looping animated image (GIF, WebP or APNG by the suffix), each
    pixel shown as a ``scale`` x ``scale`` block."""
    from PIL import Image

    form = animation_format(path)
    frames = uint8_frames(video).repeat(scale, axis=1).repeat(scale, axis=2)
    images = [Image.fromarray(frame) for frame in frames]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format=form, save_all=True, append_images=images[1:], duration=FRAME_MILLISECONDS,
                       loop=0)
