"""Tiny but complete CogVideoX and Wan 2.1 pipeline folders, written offline and deterministically.

``write_cogvideox_pipeline(folder)`` and ``write_wan_pipeline(folder)`` write what ``pipeline.save_pretrained``
writes (``model_index.json``, ``transformer/``, ``text_encoder/``, ``tokenizer/``, ``vae/``, ``scheduler/``, plus a
``README.md``): diffusers' own ``CogVideoXPipeline`` / ``WanPipeline`` load them with ``local_files_only=True`` and
run them on a CPU in a few seconds. Every component is the real class with the real architecture (CogVideoX-5B's
transformer and a T5 v1.1 encoder; Wan 2.1's transformer, VAE and a UMT5 encoder) at a tiny width, with
random-initialised weights: test and recipe inputs that exercise the real code paths from text to pixels, not
models that draw anything.

The tokenizer is a T5-style Unigram (sentencepiece-like) tokenizer trained here, with the ``tokenizers`` library,
on the captions below: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, the Metaspace "▁" pre-tokenizer and a
post-processor that appends ``</s>``, as T5's own. ``tokenizers``' Unigram trainer is not bit-for-bit
deterministic (its pieces are, its scores are not: EM sums in hash-map order, and the characters it adds at the end
get scores a 1e-4 step apart in hash-map order), so ``tokenizer_vocab`` canonicalises its result: pieces whose
scores lie within 1e-3 of each other get the group's best score, scores are rounded to 4 decimals, and pieces are
ordered by score, then by text. Weights: ``torch.manual_seed(seed)`` before each component is built, norm weights
(LayerNorm, GroupNorm, RMSNorm and the T5 / Wan variants) then moved off 1 by 0.1 * N(0, 1) from the same stream.
The same seed writes byte-identical files.

Loading the Wan folder: diffusers 0.42's ``WanTransformer3DModel.from_pretrained`` needs ``accelerate`` (a
dependency of f3export: the model keeps modules in float32, which diffusers refuses with
``low_cpu_mem_usage=False``, forced when accelerate is missing).

``python -m zoo.tiny_pipelines`` writes ``zoo/cogvideox-pipeline/`` and ``zoo/wan-pipeline/``.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import torch

from f3export.models.loading import RANDOM_WEIGHTS

# Video captions the tokenizer is trained on (and tests may prompt with).
CAPTIONS = (
    "a dog is running on the beach",
    "a man is skiing down a snowy mountain",
    "a cat is sleeping on a sofa",
    "a red car is driving through the city at night",
    "waves are crashing on the rocks at sunset",
    "a woman is dancing in the rain",
    "two children are playing football in a park",
    "a bird is flying over the ocean",
    "a horse is galloping across a green field",
    "a chef is cooking pasta in a kitchen",
    "fireworks are exploding in the night sky",
    "a boat is sailing on a calm lake",
    "a person is riding a bicycle along the river",
    "snow is falling on a quiet street",
    "a panda is eating bamboo in the forest",
    "a train is moving through the countryside",
    "clouds are drifting over the mountains",
    "a girl is reading a book under a tree",
    "an astronaut is walking on the moon",
    "a butterfly is landing on a yellow flower",
    "a small fish is swimming in a coral reef",
    "a man is playing the guitar on stage",
    "leaves are falling from the trees in autumn",
    "a time lapse of a busy city street",
    "a dog is catching a frisbee in the park",
    "a candle flame is flickering in the dark",
    "a robot is walking in a futuristic city",
    "a waterfall in a tropical jungle",
    "a plane is taking off from the airport",
    "a couple is walking on the beach at sunrise",
    "a close up of a blue eye blinking",
    "a turtle is swimming slowly in the sea",
    "rain drops are falling on a window",
    "a skateboarder is doing a trick in the street",
    "a white cat is chasing a ball",
    "a hot air balloon is rising over the valley",
    "a cowboy is riding a horse in the desert",
    "an old man is fishing from a wooden pier",
    "a baby is laughing in a sunny garden",
    "a drone shot of a winding road through the hills",
    "a lion is resting in the tall grass",
    "a surfer is riding a big wave",
    "a brown bear is walking through a stream",
    "a woman is painting a picture in her studio",
    "a cup of coffee with steam rising slowly",
    "a black and white dog is jumping into a lake",
    "a spaceship is flying past a distant planet",
    "people are walking across a crowded square",
    "a squirrel is climbing up a tall tree",
    "a racing car is speeding around a track",
    "the northern lights are glowing above a frozen lake",
    "a little boy is building a sandcastle on the beach",
    "an eagle is soaring above the canyon",
    "a pianist is playing a grand piano in a concert hall",
    "a golden retriever is running through the snow",
    "a street musician is playing the violin",
    "a volcano is erupting with glowing lava",
    "a field of sunflowers is swaying in the wind",
    "a man and a woman are cooking dinner together",
    "a jellyfish is drifting in the deep blue ocean",
    "a tiger is walking slowly through the jungle",
    "a kite is flying high in the blue sky",
    "a rabbit is hopping across a green meadow",
    "a vintage train is crossing a stone bridge",
)

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as T5's
TEXT_WIDTH = 32  # the text encoders' d_model = the transformers' text_embed_dim / text_dim

# The sizes the pipelines are called with: 9 frames -> 3 latent frames, 8 x 8 latents.
# CogVideoX: VAE 4x spatial, 4x temporal -> 32 x 32 pixels; the transformer's sample_height / sample_width (8) times
# the VAE's spatial factor (4) is CogVideoXPipeline's default height / width, and its sample_frames (9) the default
# num_frames, so calling it without sizes gives these.
COGVIDEOX_CALL = {"num_frames": 9, "height": 32, "width": 32}
# Wan 2.1: VAE 8x spatial, 4x temporal (Wan 2.1's own layout) -> 64 x 64 pixels (WanPipeline's defaults are
# Wan's 81 x 480 x 832: pass these).
WAN_CALL = {"num_frames": 9, "height": 64, "width": 64}
LATENT_SIZE = 8

# THUDM/CogVideoX-2b's scheduler config.
COGVIDEOX_SCHEDULER_CONFIG = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
    "set_alpha_to_one": True, "snr_shift_scale": 3.0, "steps_offset": 0, "timestep_spacing": "trailing",
}
# Wan-AI/Wan2.1-T2V's scheduler config (flow_shift 3.0: its 480p setting).
WAN_SCHEDULER_CONFIG = {
    "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0, "solver_order": 2,
    "solver_type": "bh2", "predict_x0": True, "lower_order_final": True, "final_sigmas_type": "zero",
    "timestep_spacing": "linspace", "steps_offset": 0,
}

COMPONENTS = ("model_index.json", "README.md", "transformer", "text_encoder", "tokenizer", "vae", "scheduler")


# --- tokenizer -------------------------------------------------------------------------------------------------

def _t5_pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                    pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])


def _t5_backend(vocab: list[tuple[str, float]]):
    """A ``tokenizers.Tokenizer`` laid out as T5's: Unigram (unk id 2), Metaspace "▁", ``</s>`` appended."""
    from tokenizers import Tokenizer, decoders, models, processors

    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=SPECIAL_TOKENS.index("<unk>"), byte_fallback=False))
    tokenizer.pre_tokenizer = _t5_pre_tokenizer()
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    return tokenizer


@functools.lru_cache(maxsize=None)
def tokenizer_vocab(vocab_size: int = 400) -> tuple[tuple[str, float], ...]:
    """The Unigram vocabulary (piece, log-probability) trained on ``CAPTIONS``, canonicalised (module docstring):
    the special tokens first, then by score and text. ``vocab_size`` is the trainer's target; these captions give
    fewer pieces (about 260)."""
    from tokenizers import Tokenizer, models, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = _t5_pre_tokenizer()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      unk_token="<unk>", show_progress=False)
    tokenizer.train_from_iterator(CAPTIONS, trainer=trainer)
    trained = json.loads(tokenizer.to_str())["model"]["vocab"]
    pieces = sorted(((piece, float(score)) for piece, score in trained if piece not in SPECIAL_TOKENS),
                    key=lambda item: -item[1])
    canonical, group_best = [], None
    for i, (piece, score) in enumerate(pieces):
        if i == 0 or pieces[i - 1][1] - score >= 1e-3:
            group_best = round(score, 4)
        canonical.append((piece, group_best))
    canonical.sort(key=lambda item: (-item[1], item[0]))
    return tuple((token, 0.0) for token in SPECIAL_TOKENS) + tuple(canonical)


def t5_tokenizer(model_max_length: int):
    """transformers' T5 tokenizer over ``tokenizer_vocab()``, no sentinel (extra_id) tokens.

    transformers 5: ``T5Tokenizer`` is the tokenizers-backed class (``T5TokenizerFast`` is the same class) and
    builds its backend from ``vocab`` itself, exactly as ``from_pretrained`` rebuilds it from tokenizer.json;
    transformers 4: ``T5TokenizerFast`` over the backend built here."""
    import inspect

    import transformers

    vocab = [list(item) for item in tokenizer_vocab()]
    kwargs = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "extra_ids": 0,
              "model_max_length": model_max_length}
    if "vocab" in inspect.signature(transformers.T5Tokenizer.__init__).parameters:
        return transformers.T5Tokenizer(vocab=[tuple(item) for item in vocab], **kwargs)
    return transformers.T5TokenizerFast(tokenizer_object=_t5_backend([tuple(item) for item in vocab]), **kwargs)


# --- weights ---------------------------------------------------------------------------------------------------

def _seeded(seed: int, build):
    """``build()`` right after ``torch.manual_seed(seed)``, in eval mode, its norms' weights (every module whose
    class name has "Norm" in it: its own ``weight`` / ``gamma``) moved off 1 by 0.1 * N(0, 1)."""
    torch.manual_seed(seed)
    model = build().eval()
    with torch.no_grad():
        for module in model.modules():
            if "norm" not in type(module).__name__.lower():
                continue
            for name, parameter in module.named_parameters(recurse=False):
                if name in ("weight", "gamma"):
                    parameter.add_(0.1 * torch.randn(parameter.shape, dtype=parameter.dtype))
    return model


def _text_config(config_class, vocab_size: int):
    # T5 v1.1 / UMT5 layout (CogVideoX's T5-XXL, Wan's UMT5-XXL): gated GELU feed-forward, untied embeddings.
    return config_class(vocab_size=vocab_size, d_model=TEXT_WIDTH, num_layers=2, num_heads=4, d_kv=8, d_ff=64,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0,
                        eos_token_id=1, decoder_start_token_id=0)


def _save(pipe, folder: Path, readme: str) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in COMPONENTS:  # a rewrite leaves no stale file behind
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    pipe.save_pretrained(folder, safe_serialization=True)
    # Said where f3export reads it, so that every build of this folder says its weights are random (diffusers
    # ignores model_index.json keys that start with "_").
    index = folder / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), RANDOM_WEIGHTS: True}, indent=2, sort_keys=True)
                     + "\n")
    (folder / "README.md").write_text(readme)
    return folder


def _readme(title: str, architecture: str, seed: int, call: dict, latent: str, scheduler: str, extra: str) -> str:
    return f"""# {title}

Random-initialised weights: this pipeline draws noise, not pictures. Made by `zoo/tiny_pipelines.py`
(`python -m zoo.tiny_pipelines`), seed {seed}; the same seed writes byte-identical files.

{architecture}

Call it with `num_frames={call['num_frames']}, height={call['height']}, width={call['width']}` (pixels): latents of
{latent}.

Scheduler: `{scheduler}`.

{extra}
Tokenizer: a T5-style Unigram tokenizer (`<pad>` = 0, `</s>` = 1, `<unk>` = 2, Metaspace "▁", `</s>` appended)
trained on the video captions in `zoo/tiny_pipelines.py` (`CAPTIONS`); an unseen word falls apart into pieces or
`<unk>`.
"""


# --- CogVideoX -------------------------------------------------------------------------------------------------

def write_cogvideox_pipeline(folder: Path, seed: int = 0, scheduler: str = "CogVideoXDDIMScheduler") -> Path:
    """Write a tiny CogVideoX-5B-architecture pipeline into ``folder`` (returned); load it with
    ``CogVideoXPipeline.from_pretrained(folder, local_files_only=True)`` and call it with ``COGVIDEOX_CALL``.

    ``scheduler``: "CogVideoXDDIMScheduler" or "CogVideoXDPMScheduler", both with CogVideoX-2b's config."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler,
                           CogVideoXPipeline, CogVideoXTransformer3DModel)
    from transformers import T5Config, T5EncoderModel

    schedulers = {"CogVideoXDDIMScheduler": CogVideoXDDIMScheduler, "CogVideoXDPMScheduler": CogVideoXDPMScheduler}
    if scheduler not in schedulers:
        raise ValueError(f"scheduler: one of {sorted(schedulers)}, not {scheduler!r}")
    tokenizer = t5_tokenizer(model_max_length=226)
    text_encoder = _seeded(seed, lambda: T5EncoderModel(_text_config(T5Config, len(tokenizer))))
    # 3 blocks: 2 down/up-samplings, both also temporal (temporal_compression_ratio 4 compresses time in the first
    # log2(4) = 2 blocks): 4x spatial, 4x temporal ((frames - 1) / 4 + 1 latent frames; 9 -> 3). Fewer blocks
    # cannot compress time 4x. Channels a multiple of norm_num_groups.
    vae = _seeded(seed, lambda: AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 16, 16), latent_channels=4,
        layers_per_block=1, norm_num_groups=4, temporal_compression_ratio=4,
        sample_height=COGVIDEOX_CALL["height"], sample_width=COGVIDEOX_CALL["width"], scaling_factor=0.7))
    # CogVideoX-5B's transformer (3D RoPE, no learned / sincos position embeddings, patch 2, no temporal patching).
    transformer = _seeded(seed, lambda: CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=TEXT_WIDTH, num_layers=2, sample_width=LATENT_SIZE, sample_height=LATENT_SIZE,
        sample_frames=COGVIDEOX_CALL["num_frames"], patch_size=2, patch_size_t=None, temporal_compression_ratio=4,
        max_text_seq_length=226, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False))
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=schedulers[scheduler](**COGVIDEOX_SCHEDULER_CONFIG))
    call = COGVIDEOX_CALL
    readme = _readme(
        "Tiny CogVideoX pipeline", "The architecture of CogVideoX-5B at a tiny width: `CogVideoXTransformer3DModel` "
        "(3D rotary embeddings, patch 2, 2 layers of 4 heads x 16, joint text-video attention over 226 text "
        "tokens), a T5 v1.1 `T5EncoderModel` (d_model 32, 2 layers), `AutoencoderKLCogVideoX` (3 blocks, "
        "latent channels 4).", seed, call,
        f"{(call['num_frames'] - 1) // 4 + 1} x {LATENT_SIZE} x {LATENT_SIZE} (frames x height x width); VAE 4x "
        "spatial, 4x temporal. These are also `CogVideoXPipeline`'s defaults here (the transformer's "
        "sample_height / sample_width / sample_frames)", scheduler,
        "Prompts: max_sequence_length 226 (the transformer's max_text_seq_length).\n")
    return _save(pipe, folder, readme)


# --- Wan 2.1 ---------------------------------------------------------------------------------------------------

def write_wan_pipeline(folder: Path, seed: int = 0, scheduler: str = "UniPCMultistepScheduler") -> Path:
    """Write a tiny Wan-2.1-architecture text-to-video pipeline into ``folder`` (returned); load it with
    ``WanPipeline.from_pretrained(folder, local_files_only=True)`` and call it with ``WAN_CALL``.

    ``scheduler``: "UniPCMultistepScheduler" (Wan 2.1's config) or "FlowMatchEulerDiscreteScheduler" (shift 3)."""
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline,
                           WanTransformer3DModel)
    from transformers import UMT5Config, UMT5EncoderModel

    if scheduler == "UniPCMultistepScheduler":
        noise_scheduler = UniPCMultistepScheduler(**WAN_SCHEDULER_CONFIG)
    elif scheduler == "FlowMatchEulerDiscreteScheduler":
        noise_scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        raise ValueError(f"scheduler: UniPCMultistepScheduler or FlowMatchEulerDiscreteScheduler, not {scheduler!r}")
    z_dim = 4
    tokenizer = t5_tokenizer(model_max_length=512)
    text_encoder = _seeded(seed, lambda: UMT5EncoderModel(_text_config(UMT5Config, len(tokenizer))))
    # Per-channel latent statistics drawn from the seed, so that the pipeline's de-normalisation
    # (latents * std + mean before decoding) is not an identity.
    generator = torch.Generator().manual_seed(seed)
    latents_mean = [round(v, 4) for v in (0.5 * torch.randn(z_dim, generator=generator)).tolist()]
    latents_std = [round(v, 4) for v in (0.5 + 2.0 * torch.rand(z_dim, generator=generator)).tolist()]
    # Wan 2.1's layout (3 down-samplings, the last two also temporal: 8x spatial, 4x temporal; the encoder reads
    # frames 1 + 4k as Wan's does) with base_dim 4 (channels 4-16) and 1 residual block per stage.
    vae = _seeded(seed, lambda: AutoencoderKLWan(
        base_dim=4, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], latents_mean=latents_mean, latents_std=latents_std,
        scale_factor_temporal=4, scale_factor_spatial=8))
    transformer = _seeded(seed, lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=z_dim, out_channels=z_dim,
        text_dim=TEXT_WIDTH, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64))
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=noise_scheduler)
    call = WAN_CALL
    readme = _readme(
        "Tiny Wan 2.1 pipeline", "The architecture of Wan 2.1 (text-to-video) at a tiny width: "
        "`WanTransformer3DModel` (patch 1x2x2, 2 layers of 4 heads x 12, cross-attention to 512 text tokens, "
        "3D RoPE, q/k RMSNorm across heads), a `UMT5EncoderModel` (d_model 32, 2 layers), `AutoencoderKLWan` "
        f"(Wan 2.1's causal 3D VAE, base_dim 4, z_dim {z_dim}, latents_mean {latents_mean}, "
        f"latents_std {latents_std}).", seed, call,
        f"{(call['num_frames'] - 1) // 4 + 1} x {LATENT_SIZE} x {LATENT_SIZE} (frames x height x width); VAE 8x "
        "spatial, 4x temporal. `WanPipeline`'s own defaults (81 x 480 x 832) are Wan's: pass these", scheduler,
        "Prompts: max_sequence_length 512 (WanPipeline's default).\n\n"
        "Loading: diffusers (0.42) loads `WanTransformer3DModel` (it keeps some modules in float32) only with "
        "`accelerate` installed; without it, `from_pretrained` raises \"`low_cpu_mem_usage` cannot be False when "
        "`keep_in_fp32_modules` is True\" (f3export depends on accelerate).\n")
    return _save(pipe, folder, readme)


def _listing(folder: Path) -> int:
    total = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = path.stat().st_size
        total += size
        print(f"  {path.relative_to(folder)}  {size:,} bytes")
    print(f"  total {total:,} bytes")
    return total


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    for name, write in (("cogvideox-pipeline", write_cogvideox_pipeline), ("wan-pipeline", write_wan_pipeline)):
        folder = write(here / name)
        print(folder)
        _listing(folder)
