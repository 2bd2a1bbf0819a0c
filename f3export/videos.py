"""Video files: the source clips a run inverts (Tune-A-Video's editing protocol), read with Pillow.

A video in f3export is RGB frames ``[3, F, H, W]`` in [-1, 1]. A source clip is an animated image (GIF, APNG,
WebP): what a user has at hand and can look at, and lossless for the few colours of a synthetic clip.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageSequence

from .artifacts import atomic_path
from .errors import RecipeError

if TYPE_CHECKING:  # torch only where a tensor is made: engines-only generation writes videos without it
    import torch

FRAME_MILLISECONDS = 125  # 8 frames per second when a GIF is played


def read_video(path: Path) -> torch.Tensor:
    """The frames of an animated image file, [3, F, H, W] in [-1, 1]; RecipeError naming the file otherwise."""
    try:
        with Image.open(path) as image:
            frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
        raise RecipeError(f"{path}: not a video file Pillow can read ({str(exc).splitlines()[0]})") from None
    import torch

    return torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1


def uint8_frames(video: Any) -> np.ndarray:
    """``video`` ([3, F, H, W] in [-1, 1], a tensor or an array) as 8-bit RGB frames [F, H, W, 3], as image files
    hold them."""
    array = video.detach().cpu().float().numpy() if hasattr(video, "detach") else np.asarray(video, np.float32)
    return np.round((np.clip(array, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(1, 2, 3, 0)


def write_gif(path: Path, video: Any) -> None:
    """``video`` ([3, F, H, W] in [-1, 1]) as a looping GIF, written atomically."""
    frames = [Image.fromarray(frame) for frame in uint8_frames(video)]
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=FRAME_MILLISECONDS,
                       loop=0)
