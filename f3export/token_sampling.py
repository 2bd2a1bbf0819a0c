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
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .artifacts import open_build
from .errors import CheckError, RecipeError, Unsupported
from .runtime import EngineRunner

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

    def text_row(self, ids: list[int], pad: int, what: str = "token ids") -> np.ndarray:
        """The text left-padded to the slots (the pad's id is never read: pads are masked)."""
        if not 0 < len(ids) <= self.text_slots:
            raise RecipeError(f"{what}: {len(ids)} text tokens; this model takes 1 to {self.text_slots}")
        bad = [i for i in ids if not self.image_vocab_size <= i < self.vocab_size]
        if bad:
            raise RecipeError(f"{what}: {bad[0]} is not a text token id [{self.image_vocab_size}, "
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
    step_seconds: list[float] = field(default_factory=list)  # wall time of each single-token step
    logits: list[np.ndarray] = field(default_factory=list)  # every step's [B, V], where kept

    def tokens_per_second(self) -> tuple[float, float, float]:
        """Median, and the 10th / 90th percentiles, over the steps (one token per step)."""
        low, median, high = np.percentile(self.step_seconds, [90, 50, 10])
        return 1 / median, 1 / low, 1 / high


def generate_tokens(step: StepFunction, layout: Layout, sessions: list[Session], texts: dict[str, list[int]],
                    frames: int, sample: Sampler | Callable[[int], Sampler], pad: int, guidance: float | None = None,
                    keep_logits: bool = False, on_token: Callable[[], None] | None = None) -> Generation:
    """The frames' image tokens, session by session (``texts``: token ids by a session's ``text``, and "guide").

    ``guidance``: the video session runs the "guide" text as a second row, and samples from
    guide + (logits - guide) x guidance, feeding the token to both rows (``my_filling_sequence``'s guider).
    ``sample``: a sampler, or one per frame (the pipeline samples frame 0 and the later frames differently).
    """
    tokens = np.zeros((frames, layout.frame_len), dtype=np.int64)
    result = Generation(tokens)
    for session in sessions:
        if session.first >= frames:
            break
        rows = [session.text] + (["guide"] if guidance is not None and session.text == "video" else [])
        given = [layout.block(tokens[f]) for f in range(session.first)]
        context = np.stack([np.concatenate([layout.text_row(texts[row], pad), *given]) for row in rows])
        text_len = np.array([len(texts[row]) for row in rows], dtype=np.int64)
        _, past = step(context, text_len, np.array(session.prefill_weights, np.float32), session.frame0_temporal,
                       None)
        weights = np.array(session.step_weights, np.float32)
        for frame in range(session.first, min(session.stop, frames)):
            choose = sample if isinstance(sample, Sampler) else sample(frame)
            fed = layout.boi_token_id
            for index in range(layout.frame_len):
                start = time.perf_counter()
                logits, past = step(np.full((len(rows), 1), fed, dtype=np.int64), text_len, weights,
                                    session.frame0_temporal, past)
                result.step_seconds.append(time.perf_counter() - start)
                last = logits[:, -1]
                last = last[1:] + (last[:1] - last[1:]) * guidance if len(rows) > 1 else last
                if keep_logits:
                    result.logits.append(last)
                fed = tokens[frame, index] = int(choose(last)[0])
                if on_token is not None:
                    on_token()
    return result


def step_flops(heads: list[tuple[int, int]], head_dim: int, layout: Layout, positions: range) -> float:
    """FLOPs (2 x multiply-adds) of the steps at ``positions`` of a step graph caching ``heads`` (spatial,
    temporal) per layer, as the graph computes them: the projections, both channels' scores and values over
    every cached key (the spatial channel masks all but the text and its own frame, but computes them: one
    graph serves prefills that span frames), the MLP and the image logits."""
    width = heads[0][0] * head_dim
    total = 0.0
    for p in positions:
        for spatial, temporal in heads:
            total += 4 * width * (spatial + temporal) * head_dim  # q, k, v and output projections
            total += 2 * (spatial + temporal) * head_dim * (p + 1)  # scores and values over p + 1 keys
            total += 8 * width * width  # MLP
        total += width * layout.image_vocab_size
    return 2 * total


class StepEngines:
    """A finished build's step engines (``components.step.<variant>``) and how its contract says to drive them."""

    def __init__(self, root: Path, variants: tuple[str, ...]):
        build = open_build(root, runtime=True)
        contract = build.doc["contract"]
        where = f"{root / 'manifest.json'}: contract.conventions.step_engine"
        raw = (contract.get("conventions") or {}).get("step_engine") if isinstance(contract, dict) else None
        if not isinstance(raw, dict):
            raise Unsupported(f"--token-ids samples image tokens with a build's step engine, and this "
                              f"{contract.get('family')!r} build has none ({where}: missing)")
        try:
            self.layout = Layout(*(int(raw[k]) for k in ("text_slots", "frame_len", "boi_token_id",
                                                            "image_vocab_size", "max_frames", "vocab_size")))
            self.pad = int(raw["pad_token_id"])
            self.sessions = {guided: [_session(s) for s in raw["guided_sessions" if guided else "sessions"]]
                             for guided in (False, True)}
            self.alpha = float(raw["guidance"]["alpha"])
            self.sampling = {k: (int(raw["sampling"][k]["top_k"]), float(raw["sampling"][k]["temperature"]))
                             for k in ("first_frame", "video")}
            names = {v: str(raw["components"][v]) for v in variants}
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckError(f"{where}: malformed ({type(exc).__name__}: {exc})") from None
        self.engines = {v: EngineRunner(root, names[v]) for v in variants}

    def cache_heads(self, variant: str) -> tuple[list[tuple[int, int]], int]:
        """(spatial, temporal) heads cached per layer, and the head size, from the engine's inputs."""
        shapes = {t.name: t.shape for t in self.engines[variant].inputs}
        layers = sorted(int(n.rsplit("_", 1)[1]) for n in shapes if n.startswith("past_spatial_"))
        heads = [(int(shapes[f"past_spatial_{i}"][2]), int(shapes.get(f"past_temporal_{i}", (0, 0, 0))[2]))
                 for i in layers]
        return heads, int(shapes["past_spatial_0"][4])

    def step_function(self, variant: str) -> StepFunction:
        runner = self.engines[variant]
        pasts = [t for t in runner.inputs if t.name.startswith("past_")]
        presents = [t.name for t in runner.outputs if t.name.startswith("present_")]

        def step(tokens, text_len, weights, frame0_temporal, past):
            if past is None:
                past = [np.zeros((len(tokens), 2, t.shape[2], 0, t.shape[4]), np.float32) for t in pasts]
            out = runner(tokens=tokens, text_len=text_len, text_weights=weights,
                         frame0_temporal=np.array([bool(frame0_temporal)]),
                         **{t.name: value for t, value in zip(pasts, past)})
            return out["logits"], [out[name] for name in presents]

        return step


def _session(raw: Any) -> Session:
    return Session(int(raw["first"]), int(raw["stop"]), str(raw["text"]),
                   tuple(float(w) for w in raw["prefill_weights"]), tuple(float(w) for w in raw["step_weights"]),
                   bool(raw["frame0_temporal"]))


def read_token_ids(value: str, what: str) -> list[int]:
    """Token ids given inline ("20345,20567") or as a file: .npy, or text of ids separated by commas or spaces."""
    path = Path(value)
    try:
        if path.suffix == ".npy":
            ids = np.load(path, allow_pickle=False).reshape(-1).tolist()
        else:
            text = path.read_text() if path.is_file() else value
            ids = [int(x) for x in text.replace(",", " ").split()]
    except (OSError, ValueError) as exc:
        raise RecipeError(f"{what} {value}: not token ids (integers, inline or a .npy / text file): {exc}") from None
    if not ids or not all(isinstance(i, int) for i in ids):
        raise RecipeError(f"{what} {value}: no integer token ids")
    return ids
