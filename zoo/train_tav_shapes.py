"""Train the Tune-A-Video architecture on the moving-shapes task, on a CPU, into a Tune-A-Video folder.

    python -m zoo.train_tav_shapes                      # the committed model: zoo/tav-shapes/
    python -m zoo.train_tav_shapes --steps 3 --out /tmp/check   # a smoke run

The network is f3export's Tune-A-Video UNet (inflated SD-1.x UNet: sparse-causal spatial attention,
temporal attention in every transformer block) at a small width, in pixel space: 16x16 RGB frames need
no autoencoder, and a learned one would put its own reconstruction error between the model and every
fidelity figure measured on it. The text conditioning is a small CLIP text encoder with a character-level
tokenizer, frozen at its seeded initialisation (the UNet learns to read it), saved as ``text_encoder/`` and
``tokenizer/`` so a build loads the folder like any Tune-A-Video checkpoint. Noise-prediction loss under
SD-1.x's DDPM schedule, captions dropped 10% of the time for classifier-free guidance.

Everything is seeded; the same arguments on the same library versions give the same weights. The loss
curve, the arguments, the wall time and the library versions go to ``training.json`` and ``loss.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import DDIMScheduler, DDPMScheduler
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from f3export.models.base import LatentVideoDiffusionAdapter
from f3export.models.tune_a_video.network import TuneAVideoConfig, TuneAVideoUNet
from f3export.tasks.shapes import FRAMES, SIZE, TRAIN_CAPTIONS, render
from zoo.text_encoder import TEXT_TOKENS, write_char_clip

UNET = TuneAVideoConfig(
    in_channels=3, out_channels=3, block_out_channels=[32, 64, 64],
    down_block_types=["CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"],
    up_block_types=["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
    layers_per_block=1, cross_attention_dim=32, norm_num_groups=8, sample_size=SIZE,
)
CAPTION_DROPOUT = 0.1


@torch.no_grad()
def embed(tokenizer: CLIPTokenizer, encoder: CLIPTextModel, texts: list[str]) -> torch.Tensor:
    ids = tokenizer(texts, padding="max_length", max_length=TEXT_TOKENS, truncation=True, return_tensors="pt")
    return encoder(ids.input_ids)[0]


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(out: Path, steps: int, batch: int, lr: float, seed: int, log_every: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, encoder = write_char_clip(out, UNET.cross_attention_dim, seed)
    captions = [c.text for c in TRAIN_CAPTIONS]
    text = embed(tokenizer, encoder, captions)
    empty = embed(tokenizer, encoder, [""])
    schedule = dict(LatentVideoDiffusionAdapter.default_scheduler)  # SD 1.x's, as Tune-A-Video trains with
    noise_scheduler = DDPMScheduler.from_config(schedule)
    alphas = noise_scheduler.alphas_cumprod

    torch.manual_seed(seed)
    unet = TuneAVideoUNet(UNET).train()
    optimiser = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed + 1)
    losses, started = [], time.perf_counter()
    for step in range(steps):
        picks = torch.randint(len(captions), (batch,), generator=generator)
        clip_seeds = torch.randint(2**31, (batch,), generator=generator)
        clips = torch.stack([render(TRAIN_CAPTIONS[i], int(s)) for i, s in zip(picks, clip_seeds)])
        context = text[picks].clone()
        dropped = torch.rand(batch, generator=generator) < CAPTION_DROPOUT
        context[dropped] = empty
        timesteps = torch.randint(schedule["num_train_timesteps"], (batch,), generator=generator)
        noise = torch.randn(clips.shape, generator=generator)
        a = alphas[timesteps].view(-1, 1, 1, 1, 1)
        noisy = a.sqrt() * clips + (1 - a).sqrt() * noise
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup=min(200, steps // 10 + 1))
        loss = torch.nn.functional.mse_loss(unet(noisy, timesteps.float(), context), noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimiser.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            window = losses[-log_every:]
            print(f"step {step + 1}/{steps}  loss {sum(window) / len(window):.4f}  "
                  f"{time.perf_counter() - started:.0f} s", flush=True)

    unet.eval()
    (out / "unet").mkdir(exist_ok=True)
    (out / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet3DConditionModel",
                                                          **UNET.to_dict()}, indent=2))
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()},
              out / "unet" / "diffusion_pytorch_model.safetensors")
    (out / "scheduler").mkdir(exist_ok=True)
    DDIMScheduler.from_config(schedule).save_config(out / "scheduler")
    curve = [sum(losses[i:i + log_every]) / len(losses[i:i + log_every]) for i in range(0, steps, log_every)]
    record = {
        "task": "moving shapes (f3export/tasks/shapes.py)", "frames": FRAMES, "size": SIZE,
        "arguments": {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "log_every": log_every},
        "loss_curve": {"every": log_every, "mean_loss": curve},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__},
        "threads": torch.get_num_threads(),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    plot_loss(curve, log_every, out / "loss.png")
    return record


def plot_loss(curve: list[float], every: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([every * (i + 1) for i in range(len(curve))], curve)
    ax.set(xlabel="step", ylabel=f"noise MSE (mean of {every} steps)", yscale="log", title="tav-shapes training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "tav-shapes")
    parser.add_argument("--steps", type=int, default=1100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args()
    train(args.out, args.steps, args.batch, args.lr, args.seed, min(args.log_every, args.steps))


if __name__ == "__main__":
    main()
