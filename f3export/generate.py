"""``f3export generate``: a video from a build's engines alone, with no PyTorch in the process.

Text -> embeddings -> the sampling loop with classifier-free guidance (the NumPy port of the scheduler class and
config recorded in the build's contract, with the family pipeline's guidance conventions: negative prompt, the
unconditional row skipped at guidance <= 1, CogVideoX's dynamic guidance) -> frames -> an animated image or an
MP4 video. The text conditioning is what the build calibrated with: the build's text encoder engine on the
tokens of its ``tokenizer.json`` (``components``), or the seeded stand-in of a model folder without a text
encoder (``text_standin``). Frames: the build's VAE decoder engine on the final latents (frame by frame, or the
whole clip for a causal 3D VAE); else a pixel-space model's output as is; else latents shown as their first
three channels, each scaled to [-1, 1] over the clip (a picture of the latents, stated in the caption line).
The initial noise is NumPy's from ``seed`` (which then draws what a random sampler's steps need): the same
seed gives the same video here, not the PyTorch sampler's video of that seed.

With ``compare``, the same prompt and noise run through the original engine too, and the file shows original
(left) and pruned (right) side by side, with the PSNR between them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifacts import atomic_path, open_build
from .errors import CheckError, CheckpointError, EngineError, RecipeError, Unsupported
from .prompts import CLEANERS, clean_prompt
from .runtime import EngineRunner, contract_tensors, denoiser, validated_ranges
from .scheduling import numpy_sampler
from .scheduling.guidance import guidance_at
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
    """The sampling loop of a finished build on its engines (``variant``: "pruned" or "original")."""

    def __init__(self, root: Path, variants: tuple[str, ...] = ("pruned",)):
        build = open_build(root, runtime=True)
        contract = build.doc["contract"]
        conventions = contract.get("conventions", {})
        where = f"{root / 'manifest.json'}: contract.conventions"
        scheduler, text = conventions.get("scheduler"), conventions.get("text_conditioning")
        if not isinstance(scheduler, dict) or "guidance" not in conventions:
            tokens = "step_engine" in conventions if isinstance(conventions, dict) else False
            raise Unsupported(f"generate samples text-to-video diffusion models, and this {contract.get('family')!r} "
                              f"build is not one (no scheduler and guidance in {where})"
                              + ("; it samples image tokens: give --token-ids" if tokens else ""))
        if not isinstance(text, dict):
            raise CheckError(f"{where}.text_conditioning: missing (a build from before f3export generate; "
                             "rebuild it)")
        # the engines first: each refuses a manifest whose contract is not the one it embeds (an edit of either)
        self.engines = {variant: denoiser(root, variant) for variant in variants}
        components = build.doc.get("components") or {}
        if not isinstance(components, dict):
            raise CheckError(f"{root / 'manifest.json'}: components: expected a table")
        self.text_encoder = self.tokenizer = self.decoder = None
        if not str(text.get("source", "")).startswith(STANDIN):
            if "text_encoder" not in components:
                raise CheckError(f"{where}.text_conditioning: this model's prompts go through its text encoder, and "
                                 "this build has no text encoder engine to run it without PyTorch")
            from tokenizers import Tokenizer

            entry = components["text_encoder"]
            self.tokenizer = Tokenizer.from_file(str(build.verified_file(
                entry.get("tokenizer"), "export", "components.text_encoder.tokenizer")))
            self.text_encoder = EngineRunner(root, "text_encoder")
        if "vae_decoder" in components:
            self.decoder = EngineRunner(root, "vae_decoder")
        try:  # the manifest is untrusted input: a malformed field is one line, not a traceback
            self.scheduler_class, self.scheduler_config = str(scheduler["class"]), dict(scheduler["config"])
            guidance = conventions["guidance"]
            self.negative_prompt = str(guidance.get("negative_prompt", ""))
            self.skip_unconditional = bool(guidance.get("skip_unconditional", False))
            self.has_dynamic_cfg = "dynamic_cfg" in guidance
            self.noise_channels = int(conventions["output"]["noise_channels"][1])
            inputs = contract_tensors(build, "inputs")
            sample = next(t for t in inputs if t.name == "sample")
            self.channels = int(sample.shape[1])
            ranges = validated_ranges(build, inputs)
            self.batch_range, self.frame_range = sample.validated_sizes(0, ranges), sample.validated_sizes(2, ranges)
            self.standin = (int(text["tokens"]), int(text["width"]))  # [tokens, width] of the stand-in
            self.prompt_clean = text.get("prompt_clean")
            if self.prompt_clean is not None and self.prompt_clean not in CLEANERS:
                raise ValueError
        except (KeyError, TypeError, IndexError, ValueError, StopIteration, AttributeError):
            raise CheckError(f"{where}: malformed (scheduler, guidance, text conditioning, output noise channels or "
                             "the sample input)") from None
        try:  # refused in one line before any work: a port this runtime lacks, a config no schedule comes from
            self.train_steps = numpy_sampler(self.scheduler_class, self.scheduler_config).config["num_train_timesteps"]
        except CheckpointError as exc:
            raise CheckpointError(f"{exc} ({where}.scheduler)") from None
        model = build.recipe.model
        self.frames, self.height, self.width = model.frames, model.latent_height, model.latent_width
        if self.decoder is not None and self.decoder.inputs[0].rank == 5:  # traced for the build's frames alone
            self.frame_range = (self.frames, self.frames)
        self.validation = _sampling_defaults(build.doc["recipe"].get("validation"), root)

    def embed(self, prompt: str) -> np.ndarray:
        """[1, tokens, width]: the build's text encoder engine on the prompt's tokens, else the seeded stand-in."""
        if self.text_encoder is None:
            return seeded_text_embedding(prompt, *self.standin)
        ids = np.asarray([self.tokenizer.encode(clean_prompt(self.prompt_clean, prompt)).ids], dtype=np.int64)
        return self.text_encoder(input_ids=ids)

    def guided(self, guidance_scale: float) -> bool:
        """Whether a step runs the unconditional row too (batch 2): the family pipeline's rule."""
        return not self.skip_unconditional or guidance_scale > 1.0

    def check_request(self, steps: int, guidance_scale: float, dynamic_cfg: bool, frames: int) -> None:
        """Refuse (one line) sampling settings this build cannot run or did not validate, before any work."""
        if dynamic_cfg and not self.has_dynamic_cfg:
            raise RecipeError("--dynamic-cfg: this build's family samples with a constant guidance scale")
        if not 0 <= guidance_scale < math.inf:  # NaN compares False
            raise RecipeError(f"--guidance-scale {guidance_scale}: not a finite number >= 0")
        if not 1 <= steps <= self.train_steps:
            raise RecipeError(f"--steps {steps}: the scheduler steps 1 to its num_train_timesteps = {self.train_steps}")
        low, high = self.frame_range
        if not low <= frames <= high:
            raise RecipeError(f"--frames {frames}: this build validated its engines at {low} to {high} frames")
        batch, (low, high) = 2 if self.guided(guidance_scale) else 1, self.batch_range
        if not low <= batch <= high:
            raise RecipeError(f"--guidance-scale {guidance_scale:g}: runs the denoiser at batch {batch}, which this "
                              f"build did not validate (batch {low} to {high}); rebuild with [engine].profile_batch "
                              f"= [{min(low, batch)}, {low}, {max(high, batch)}]")
        numpy_sampler(self.scheduler_class, self.scheduler_config).set_timesteps(steps)

    def sample(self, variant: str, prompt: str, seed: int, steps: int, guidance_scale: float,
               negative_prompt: str | None = None, dynamic_cfg: bool = False, on_step=None,
               noise: np.ndarray | None = None, frames: int | None = None) -> Clip:
        """One video of ``frames`` latent frames (default: the build's). ``noise``: the initial latents (default:
        NumPy's normal draw of ``seed``, whose generator then draws whatever a random sampler's steps need)."""
        frames = self.frames if frames is None else frames
        self.check_request(steps, guidance_scale, dynamic_cfg, frames)
        engine = self.engines[variant]
        rng = np.random.default_rng(seed)
        latents = rng.standard_normal((1, self.channels, frames, self.height, self.width), dtype=np.float32) \
            if noise is None else noise
        sampler = numpy_sampler(self.scheduler_class, self.scheduler_config, rng)
        sampler.set_timesteps(steps)
        guided = self.guided(guidance_scale)
        negative = self.negative_prompt if negative_prompt is None else negative_prompt
        context = np.concatenate([self.embed(negative), self.embed(prompt)]) if guided else self.embed(prompt)
        latents = (latents * sampler.init_noise_sigma).astype(np.float32)
        for i, t in enumerate(sampler.timesteps):
            model_input = sampler.scale_model_input(latents, t)
            noise_pred = engine(sample=np.concatenate([model_input] * len(context)), timestep=np.float32(t),
                                encoder_hidden_states=context)[:, :self.noise_channels]
            if guided:
                uncond, cond = noise_pred[:1], noise_pred[1:]
                noise_pred = uncond + guidance_at(guidance_scale, dynamic_cfg, steps, float(t)) * (cond - uncond)
            latents = sampler.step(noise_pred, t, latents)
            if on_step is not None:
                on_step(i)
        clip = self._frames(latents)
        for name, values in (("final latents", clip.latents), ("frames", clip.video)):
            if not np.isfinite(values).all():  # a NaN video is no video: refused, nothing written
                raise EngineError(f"the {variant} engine's {name} hold {np.size(values) - np.isfinite(values).sum()} "
                                  f"non-finite values of {np.size(values)} (prompt {prompt!r}, seed {seed}, {steps} "
                                  "steps): no video written")
        return clip

    def _frames(self, latents: np.ndarray) -> Clip:
        if self.decoder is not None:
            if self.decoder.inputs[0].rank == 5:  # a causal 3D VAE: the clip at once, [1, C, F, h, w]
                video = self.decoder(latents=latents)[0]
            else:  # frame by frame
                video = self.decoder(latents=latents[0].transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
            return Clip(video, latents, "frames decoded by the build's VAE decoder engine")
        if self.channels == 3:
            return Clip(latents[0], latents, "RGB frames (a pixel-space model)")
        shown = latents[0, :3]
        low = shown.min(axis=(1, 2, 3), keepdims=True)
        high = shown.max(axis=(1, 2, 3), keepdims=True)
        return Clip((shown - low) / np.maximum(high - low, 1e-12) * 2 - 1, latents,
                    "latent channels 0-2, each scaled over the clip (no VAE decoder in this build)")


def inside_build(path: Path, root: Path) -> bool:
    """Whether ``path`` (resolved, symlinks followed) lies in the build folder ``root``: a file written there would
    change what ``check`` verifies next."""
    return path.resolve().is_relative_to(root.resolve())


def _sampling_defaults(section, root: Path) -> dict:
    """The build's held-out sampling settings (steps, guidance, negative prompt, dynamic guidance), the defaults
    of generation."""
    section = section if isinstance(section, dict) else {}
    steps, guidance = section.get("steps"), section.get("guidance_scale")
    negative, dynamic = section.get("negative_prompt"), section.get("use_dynamic_cfg", False)
    if not (isinstance(steps, int) and 1 <= steps <= 1000 and isinstance(guidance, (int, float)) and guidance >= 0
            and isinstance(negative, (str, type(None))) and isinstance(dynamic, bool)):
        raise CheckError(f"{root / 'manifest.json'}: recipe.validation steps / guidance_scale / negative_prompt / "
                         "use_dynamic_cfg missing or malformed")
    return {"steps": steps, "guidance_scale": float(guidance), "negative_prompt": negative, "dynamic_cfg": dynamic}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two videos in [-1, 1] (peak-to-peak 2)."""
    mse = float(np.mean((np.clip(a, -1, 1) - np.clip(b, -1, 1)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4 / mse)


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 2) -> np.ndarray:
    """Two videos [3, F, H, W] next to each other along the width, a white gap between them."""
    spacer = np.ones(left.shape[:3] + (gap,), dtype=left.dtype)
    return np.concatenate([left, spacer, right], axis=3)


VIDEO_FORMATS = {".mp4": "mp4"}  # videos PyAV writes with the FFmpeg its wheel ships (H.264, yuv420p)


def animation_format(path: Path) -> str:
    """The container or image format of the file ``path`` names; RecipeError for any other suffix."""
    suffix = path.suffix.lower()
    form = FORMATS.get(suffix) or VIDEO_FORMATS.get(suffix)
    if form is None:
        raise RecipeError(f"{path}: write one of {', '.join([*FORMATS, *VIDEO_FORMATS])}")
    return form


def write_animation(path: Path, video: np.ndarray, scale: int = 1) -> None:
    """``video`` ([3, F, H, W] in [-1, 1]) as a looping animated image (GIF, WebP or APNG) or an H.264 MP4 by the
    suffix, each pixel shown as a ``scale`` x ``scale`` block, at 8 frames per second."""
    form = animation_format(path)
    frames = uint8_frames(video).repeat(scale, axis=1).repeat(scale, axis=2)
    with atomic_path(path) as tmp:
        if form in VIDEO_FORMATS.values():
            _write_video(tmp, form, frames)
            return
        from PIL import Image

        images = [Image.fromarray(frame) for frame in frames]
        images[0].save(tmp, format=form, save_all=True, append_images=images[1:], duration=FRAME_MILLISECONDS,
                       loop=0)


def _write_video(path: Path, form: str, frames: np.ndarray) -> None:
    """8-bit RGB frames [F, H, W, 3] as H.264 (yuv420p, what players take: sizes padded to even by edge pixels)."""
    import av

    frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")
    with av.open(str(path), mode="w", format=form) as container:
        stream = container.add_stream("libx264", rate=1000 // FRAME_MILLISECONDS)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "12"}  # near-lossless: the frames are the result, not a preview
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
