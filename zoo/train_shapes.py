"""Train a reference model on the moving-shapes task, on a CPU, into its family's real folder format.

    python -m zoo.train_shapes tune-a-video           # into zoo/tav-shapes/
    python -m zoo.train_shapes latte                  # into zoo/latte-shapes/
    python -m zoo.train_shapes cogvideox              # into zoo/cogvideox-shapes/
    python -m zoo.train_shapes cogvideox-2b           # into zoo/cogvideox-2b-shapes/ (48 heads)
    python -m zoo.train_shapes latte --steps 3 --out /tmp/check   # a smoke run

Each network is one f3export loads (``[model].family``), at a small width, in pixel space: 16x16 RGB frames
need no autoencoder, and a learned one would put its own reconstruction error between the model and every
fidelity figure measured on it. Tune-A-Video: f3export's inflated SD-1.x UNet (sparse-causal spatial
attention, temporal attention in every transformer block), with attention at 8x8 and 4x4 only (at 16x16 it
tripled the step time). Latte: diffusers' ``LatteTransformer3DModel`` (alternating spatial and temporal
blocks, sinusoidal frame positions, adaLN-single). CogVideoX: diffusers' ``CogVideoXTransformer3DModel`` in
CogVideoX-5B's layout (text and video tokens in one joint 3D attention per block, 3D RoPE, per-head q/k
LayerNorm), sampled with ``CogVideoXDDIMScheduler`` at SNR shift 1 (the training schedule's own alphas).
The text conditioning is a small CLIP text encoder whose tokenizer reads the caption grammar's words as
single tokens (WORDS), frozen as distinct word vectors (WORD_VECTOR_SCALE; the network learns to read them),
saved as ``text_encoder/`` and ``tokenizer/`` beside the network, with the ``scheduler/`` sampling uses (the
family's DDIM). Loss: v-prediction under DDPM's linear schedule (see
SCHEDULE), captions dropped 10% of the time for classifier-free guidance. What each choice was measured
against: zoo/README.md.

Everything is seeded; the same arguments on the same library versions give the same weights. The loss
curve, the arguments, the wall time and the library versions go to ``training.json`` and ``loss.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import DDPMScheduler

from f3export.models import get_adapter
from f3export.models.base import LatentVideoDiffusionAdapter
from f3export.models.pipeline_parts import load_clip_text_encoder
from f3export.models.tune_a_video.network import TuneAVideoConfig
from f3export.tasks.shapes import COLOURS, DIRECTIONS, FRAMES, SHAPES, SIZE, SPEEDS, TRAIN_CAPTIONS, render
from zoo.text_encoder import write_char_clip

TEXT_WIDTH = 32
# The caption grammar's words, one token each: read character by character, a frozen encoder told captions
# differing only in direction apart 3-10x less than captions differing in colour or shape.
WORDS = ("a", *COLOURS, *SHAPES, "moves", *DIRECTIONS, *filter(None, SPEEDS))
# Start, the longest caption's 6 words, end: SD's 77 would add 69 padding keys to every cross-attention (8 or
# 77 made no difference to what the network learned, zoo/README.md; 8 is cheaper).
TEXT_TOKENS = 8
# Frozen word vectors at 10x CLIP's output scale: at CLIP's own initialisation the caption reaches the network
# too weakly for it to learn that a direction word moves the shape (a product of caption, frame and place);
# it learned colour (which needs no frame) and nothing else (zoo/README.md, run 8).
WORD_VECTOR_SCALE = 10.0
CAPTION_DROPOUT = 0.1
# Pixel space: DDPM's linear schedule (Ho et al.), not SD's latent one, under which a 16x16 frame's shape stays
# visible in its own noise until t ~ 900 and each frame's place is settled before the frames can agree on it;
# v-prediction, whose samples come out clean where the same network predicting the noise left residual noise.
SCHEDULE = {**LatentVideoDiffusionAdapter.default_scheduler, "beta_schedule": "linear", "beta_start": 0.0001,
            "beta_end": 0.02, "prediction_type": "v_prediction"}


@dataclass(frozen=True)
class Trainee:
    """A family's network for the task, and how it trains by default."""

    family: str
    config: dict[str, Any]
    folder: str  # under zoo/
    steps: int
    batch: int = 8
    lr: float = 2e-3
    schedule: dict[str, Any] = field(default_factory=lambda: dict(SCHEDULE))
    storage: torch.dtype = torch.float32  # of the saved weights (trained in float32; loaders read them as float32)


TRAINEES = {
    "tune-a-video": Trainee("tune-a-video", TuneAVideoConfig(
        in_channels=3, out_channels=3, block_out_channels=[32, 64, 64],
        down_block_types=["DownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D"],
        up_block_types=["CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "UpBlock3D"],
        layers_per_block=1, cross_attention_dim=TEXT_WIDTH, norm_num_groups=8, sample_size=SIZE,
    ).to_dict(), "tav-shapes", steps=1500, storage=torch.float16),  # 1.8 M parameters: 3.6 MB, not 7.1
    "latte": Trainee("latte", {
        "num_attention_heads": 4, "attention_head_dim": 16, "in_channels": 3, "out_channels": 6, "num_layers": 4,
        "sample_size": SIZE, "patch_size": 2, "norm_type": "ada_norm_single", "caption_channels": TEXT_WIDTH,
        "cross_attention_dim": 64, "video_length": FRAMES, "activation_fn": "gelu-approximate",
        "norm_elementwise_affine": False, "norm_eps": 1e-6,
    }, "latte-shapes", steps=4500, lr=1e-3),
    "cogvideox": Trainee("cogvideox", {
        # heads of 32 channels: CogVideoX gives a quarter of a head's rotary channels to time, and at 16 those 4
        # turn 1 and 0.01 rad per frame, so frames 0 and 6 look alike (run 1 of it: noisy first and last frames)
        **get_adapter("cogvideox").checkpoint.presets["tiny"], "num_attention_heads": 4, "attention_head_dim": 32,
        "in_channels": 3, "out_channels": 3, "time_embed_dim": 64, "text_embed_dim": TEXT_WIDTH, "num_layers": 4,
        "sample_width": SIZE, "sample_height": SIZE, "max_text_seq_length": TEXT_TOKENS,
    }, "cogvideox-shapes", steps=3000, lr=1e-3, schedule={**SCHEDULE, "snr_shift_scale": 1.0},
        storage=torch.float16),  # 1.2 M parameters: 2.5 MB, not 4.9
    # More heads than the task needs, for pruning to have room (issue 28): CogVideoX-2B's layout (sincos
    # positions added to the input, no RoPE, so heads of 16 channels keep every frame apart), 6 blocks of 8 heads
    # (48, the reference's 16 split finer and 1.5x deeper) at the reference's width; 0.6 s a step here.
    "cogvideox-2b": Trainee("cogvideox", {
        **get_adapter("cogvideox").checkpoint.presets["cogvideox-2b"], "num_attention_heads": 8,
        "attention_head_dim": 16, "in_channels": 3, "out_channels": 3, "time_embed_dim": 64,
        "text_embed_dim": TEXT_WIDTH, "num_layers": 6, "sample_width": SIZE, "sample_height": SIZE,
        "sample_frames": (FRAMES - 1) * 4 + 1, "max_text_seq_length": TEXT_TOKENS,
    }, "cogvideox-2b-shapes", steps=3000, lr=1e-3, schedule={**SCHEDULE, "snr_shift_scale": 1.0},
        storage=torch.float16),
}


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(trainee: Trainee, out: Path, steps: int, batch: int, lr: float, seed: int, log_every: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    write_char_clip(out, TEXT_WIDTH, seed, WORDS, TEXT_TOKENS, WORD_VECTOR_SCALE)
    encode = load_clip_text_encoder(out)  # the folder's own text conditioning, exactly as sampling reads it
    captions = [c.text for c in TRAIN_CAPTIONS]
    text = encode(captions)
    empty = encode([""])
    noise_scheduler = DDPMScheduler.from_config(trainee.schedule)
    alphas = noise_scheduler.alphas_cumprod

    adapter = get_adapter(trainee.family)
    torch.manual_seed(seed)
    net = adapter.checkpoint.build(trainee.config).train()
    channels = adapter.latent_channels(net)  # more outputs are a learned variance (Latte) DDIM does not use
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed + 1)
    losses, started = [], time.perf_counter()
    for step in range(steps):
        picks = torch.randint(len(captions), (batch,), generator=generator)
        clip_seeds = torch.randint(2**31, (batch,), generator=generator)
        clips = torch.stack([render(TRAIN_CAPTIONS[i], int(s)) for i, s in zip(picks, clip_seeds)])
        context = text[picks].clone()
        dropped = torch.rand(batch, generator=generator) < CAPTION_DROPOUT
        context[dropped] = empty
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn(clips.shape, generator=generator)
        a = alphas[timesteps].view(-1, 1, 1, 1, 1)
        noisy = a.sqrt() * clips + (1 - a).sqrt() * noise
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup=min(200, steps // 10 + 1))
        target = noise_scheduler.get_velocity(clips, noise, timesteps)
        loss = torch.nn.functional.mse_loss(net(noisy, timesteps.float(), context)[:, :channels], target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimiser.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            window = losses[-log_every:]
            print(f"step {step + 1}/{steps}  loss {sum(window) / len(window):.4f}  "
                  f"{time.perf_counter() - started:.0f} s", flush=True)

    adapter.checkpoint.save_network(net.eval().to(trainee.storage), trainee.config, out)
    adapter.scheduler_class.from_config(trainee.schedule).save_config(out / "scheduler")  # the family's sampler
    curve = [sum(losses[i:i + log_every]) / len(losses[i:i + log_every]) for i in range(0, steps, log_every)]
    record = {
        "family": trainee.family, "task": "moving shapes (f3export/tasks/shapes.py)", "frames": FRAMES, "size": SIZE,
        "arguments": {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "log_every": log_every},
        "loss_curve": {"every": log_every, "mean_loss": curve},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__},
        "threads": torch.get_num_threads(),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    plot_loss(curve, log_every, out / "loss.png", f"{out.name} training")
    return record


def plot_loss(curve: list[float], every: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([every * (i + 1) for i in range(len(curve))], curve)
    ax.set(xlabel="step", ylabel=f"v-prediction MSE (mean of {every} steps)", yscale="log", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=TRAINEES)
    parser.add_argument("--out", type=Path, help="default: zoo/<the family's folder>")
    parser.add_argument("--steps", type=int, help="default: the family's")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args()
    trainee = TRAINEES[args.family]
    steps = args.steps or trainee.steps
    train(trainee, args.out or Path(__file__).parent / trainee.folder, steps, args.batch or trainee.batch,
          args.lr or trainee.lr, args.seed, min(args.log_every, steps))


if __name__ == "__main__":
    main()
