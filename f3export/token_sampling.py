"""Image tokens from a KV-cache step engine, as CogVideo's pipeline samples them, with NumPy alone.

The build's contract (``conventions.step_engine``) says how: the sequence layout (text slots, frame length,
<start_of_image>), and the sessions of ``cogvideo_pipeline.process_stage1``. Frame 0 is generated from its own
text with the temporal channel off; frames 1 on from the video text with frame 0 given, each session a prefill
of its context (the text, then the given frames' blocks) and one step per token after it. A frame block is
<start_of_image> followed by the frame's image tokens 0..frame_len-2; position p >= text slots predicts image
token (p - text slots) mod frame_len of its frame, and the last token of a frame is predicted, never fed.

Sampling stays here, as in the pipeline's loop: greedy (top-1), or top-k at a temperature from a seeded NumPy
generator. The pipeline's own ``CoglmStrategy`` samples a cluster of image tokens first (its
``cluster_label2.npy``, not shipped), so a seeded run here is not the pipeline's sample of that seed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import RecipeError

# (tokens [B, T], text_len [B], text_weights [2], frame0_temporal, past) -> (logits [B, T, V], present)
StepFunction = Callable[[np.ndarray, np.ndarray, np.ndarray, bool, list[np.ndarray] | None],
                        tuple[np.ndarray, list[np.ndarray]]]


@dataclass(frozen=True)
class Layout:
    text_slots: int
    frame_len: int
    boi_token_id: int
    image_vocab_size: int
    max_frames: int
    vocab_size: int

    def text_row(self, ids: list[int], pad: int) -> np.ndarray:
        """The text left-padded to the slots (the pad's id is never read: pads are masked)."""
        if not 0 < len(ids) <= self.text_slots:
            raise RecipeError(f"token ids: {len(ids)} text tokens; this model takes 1 to {self.text_slots}")
        bad = [i for i in ids if not self.image_vocab_size <= i < self.vocab_size]
        if bad:
            raise RecipeError(f"token ids: {bad[0]} is not a text token id [{self.image_vocab_size}, "
                              f"{self.vocab_size})")
        return np.array([pad] * (self.text_slots - len(ids)) + list(ids), dtype=np.int64)

    def block(self, frame_tokens: np.ndarray) -> np.ndarray:
        """A given frame's block: <start_of_image> then its image tokens but the last."""
        return np.concatenate([[self.boi_token_id], frame_tokens[:-1]]).astype(np.int64)


@dataclass(frozen=True)
class Session:
    """One ``my_filling_sequence`` call: frames ``first``..``stop`` - 1 generated after the earlier ones given."""

    first: int
    stop: int
    text: str  # "first_frame" or "video": which of the request's texts
    prefill_weights: tuple[float, float]  # text weights (spatial, temporal) of the prefill
    step_weights: tuple[float, float]  # and of each single-token step
    frame0_temporal: bool


@dataclass(frozen=True)
class Sampler:
    """Greedy where ``top_k`` is 1, else top-k at ``temperature`` (seeded)."""

    top_k: int = 1
    temperature: float = 1.0
    seed: int = 0
    rng: np.random.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "rng", np.random.default_rng(self.seed))

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """[B, V] -> [B] token ids."""
        if self.top_k == 1:
            return logits.argmax(-1)
        scaled = logits.astype(np.float64) / self.temperature
        kept = np.argpartition(-scaled, self.top_k - 1, axis=-1)[:, :self.top_k]
        chosen = []
        for row, candidates in zip(scaled, kept):
            weights = np.exp(row[candidates] - row[candidates].max())
            chosen.append(candidates[self.rng.choice(len(candidates), p=weights / weights.sum())])
        return np.array(chosen)


@dataclass
class Generation:
    tokens: np.ndarray  # [frames, frame_len] image token ids
    steps: int  # single-token steps run
    step_seconds: float  # wall time of those steps
    logits: list[np.ndarray] = field(default_factory=list)  # every step's [B, V], where kept


def generate_tokens(step: StepFunction, layout: Layout, sessions: list[Session], texts: dict[str, list[int]],
                    frames: int, sample: Sampler, pad: int, keep_logits: bool = False,
                    on_frame: Callable[[int], None] | None = None) -> Generation:
    """The frames' image tokens, session by session (``texts``: token ids by a session's ``text``)."""
    tokens = np.zeros((frames, layout.frame_len), dtype=np.int64)
    result = Generation(tokens, 0, 0.0)
    for session in sessions:
        if session.first >= frames:
            break
        row = layout.text_row(texts[session.text], pad)
        context = np.concatenate([row, *(layout.block(tokens[f]) for f in range(session.first))])
        text_len = np.array([len(texts[session.text])], dtype=np.int64)
        _, past = step(context[None], text_len, np.array(session.prefill_weights, np.float32),
                       session.frame0_temporal, None)
        weights = np.array(session.step_weights, np.float32)
        for frame in range(session.first, min(session.stop, frames)):
            fed = layout.boi_token_id
            for index in range(layout.frame_len):
                start = time.perf_counter()
                logits, past = step(np.array([[fed]], dtype=np.int64), text_len, weights, session.frame0_temporal,
                                    past)
                result.step_seconds += time.perf_counter() - start
                result.steps += 1
                if keep_logits:
                    result.logits.append(logits[:, -1])
                fed = tokens[frame, index] = int(sample(logits[:, -1])[0])
            if on_frame is not None:
                on_frame(frame)
    return result
