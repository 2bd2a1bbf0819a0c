"""Today's pipelines from a real folder: a tiny but complete CogVideoX / Wan pipeline folder (T5 / UMT5 text
encoder with a tokenizer trained here, the causal 3D VAE, the transformer, the folder's scheduler), read by
f3export by the classes the folder names, and sampled from text to pixels exactly as diffusers' own
``CogVideoXPipeline`` / ``WanPipeline`` sample it, for the original model and for the pruned one (frame-local
heads, ratio 0.5) put into the pipeline as its transformer."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import CogVideoXPipeline, WanPipeline

from f3export.dropin import EngineDenoiser, pruned_denoiser
from f3export.errors import CheckpointError
from f3export.models import get_adapter
from f3export.models.base import VideoShape
from f3export.models.protocols import DiffusionRun
from f3export.prune import apply_plan, make_plan
from f3export.recipe import PruningSection
from zoo.tiny_pipelines import COGVIDEOX_CALL, LATENT_SIZE, WAN_CALL, write_cogvideox_pipeline, write_wan_pipeline

from conftest import relative_l2, run, scores_for
from test_deploy import REPO, generate_without_torch

FAMILIES = {  # family -> (folder writer, the diffusers pipeline, its call sizes)
    "cogvideox": (write_cogvideox_pipeline, CogVideoXPipeline, COGVIDEOX_CALL),
    "wan": (write_wan_pipeline, WanPipeline, WAN_CALL),
}
CASES = [("cogvideox", "CogVideoXDDIMScheduler", False), ("cogvideox", "CogVideoXDDIMScheduler", True),
         ("cogvideox", "CogVideoXDPMScheduler", False), ("cogvideox", "CogVideoXDPMScheduler", True),
         ("wan", "UniPCMultistepScheduler", False), ("wan", "FlowMatchEulerDiscreteScheduler", False)]
PROMPT, NEGATIVE, SEED, STEPS = "a dog is running on the beach", "blurry, low quality", 3, 4


def frame_local(adapter, model):
    """The model with half its joint-attention heads frame-local (a seeded ranking: any plan must agree)."""
    plan = make_plan(scores_for(model, adapter=adapter), PruningSection(ratio=0.5, action="frame-local"))
    pruned = copy.deepcopy(model)
    apply_plan(pruned, adapter.structure.temporal_sites(pruned), plan.kept_heads, plan.local_heads)
    assert sum(len(heads) for heads in plan.local_heads.values()) > 0
    return pruned


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}
    for family, scheduler, _ in CASES:
        if (family, scheduler) not in made:
            made[family, scheduler] = FAMILIES[family][0](tmp_path_factory.mktemp(family) / "pipe",
                                                          scheduler=scheduler)
    return made


@pytest.mark.parametrize("family,scheduler,dynamic_cfg", CASES)
def test_f3export_samples_text_to_pixels_as_the_diffusers_pipeline_does(folders, family, scheduler, dynamic_cfg):
    folder = folders[family, scheduler]
    adapter = get_adapter(family)
    bundle = adapter.checkpoint.load_folder(folder)
    assert type(adapter.scheduler(bundle).scheduler).__name__ == scheduler
    call = FAMILIES[family][2]
    shape = VideoShape((call["num_frames"] - 1) // 4 + 1, LATENT_SIZE, LATENT_SIZE)
    run = DiffusionRun(PROMPT, SEED, STEPS, 6.0, negative_prompt=NEGATIVE, dynamic_cfg=dynamic_cfg)
    channels = adapter.latent_channels(bundle.model)
    noise = torch.randn((1, channels, shape.frames, shape.latent_height, shape.latent_width),
                        generator=torch.Generator().manual_seed(SEED))
    pipeline_class = FAMILIES[family][1]
    extra = {"use_dynamic_cfg": dynamic_cfg} if family == "cogvideox" else {}
    for variant, model in (("original", bundle.model), ("pruned", frame_local(adapter, bundle.model))):
        ours = adapter.trajectory(bundle, model, run, shape)
        pipe = pipeline_class.from_pretrained(folder, local_files_only=True)  # diffusers' own transformer and
        if variant == "pruned":  # attention processors; the pruned one put in its place, called by the pipeline
            pipe.transformer = model.inner
        latents = noise.transpose(1, 2) if family == "cogvideox" else noise  # the pipeline's layout
        theirs = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=6.0,
                      latents=latents, generator=torch.Generator().manual_seed(SEED), output_type="np", **call,
                      **extra).frames[0]
        video = (ours.video / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).numpy()  # [F, H, W, 3] as theirs
        assert video.shape == theirs.shape == (call["num_frames"], call["height"], call["width"], 3)
        error = relative_l2(torch.from_numpy(video), torch.from_numpy(theirs))
        assert error <= 1e-5, f"{variant}: video rel. L2 {error:.2e}"


def test_without_guidance_the_unconditional_row_is_not_run_as_the_pipelines_do(folders):
    adapter = get_adapter("wan")
    bundle = adapter.checkpoint.load_folder(folders["wan", "UniPCMultistepScheduler"])
    batches = []
    hook = bundle.model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    adapter.trajectory(bundle, bundle.model, DiffusionRun(PROMPT, 0, 2, 1.0), VideoShape(3, 8, 8))
    adapter.trajectory(bundle, bundle.model, DiffusionRun(PROMPT, 0, 2, 5.0), VideoShape(3, 8, 8))
    hook.remove()
    assert batches == [1, 1, 2, 2]


def test_a_t5_folder_gives_real_embeddings_and_says_so(folders):
    adapter = get_adapter("cogvideox")
    bundle = adapter.checkpoint.load_folder(folders["cogvideox", "CogVideoXDDIMScheduler"])
    assert bundle.encode_text.class_name == "T5EncoderModel" and bundle.encode_text.tokens == 226
    assert adapter.text_source(bundle).startswith("T5EncoderModel (")
    a, b = bundle.encode_text(["a dog is running", "a man is skiing"])
    assert a.shape == (226, 32) and not torch.allclose(a, b)
    ids = bundle.encode_text.token_ids(["a dog"])[0]
    assert ids[-1] == 0 and 1 in ids.tolist()  # padded with <pad> after T5's </s>


def test_wan_embeddings_of_padding_are_zero_as_wan_pipeline_trims_them(folders):
    adapter = get_adapter("wan")
    bundle = adapter.checkpoint.load_folder(folders["wan", "UniPCMultistepScheduler"])
    ids = bundle.encode_text.token_ids(["a dog"])[0]
    length = int((ids != 0).sum())
    embedding = bundle.encode_text(["a dog"])[0]
    assert embedding.shape == (512, 32) and length < 10
    assert embedding[:length].abs().min() > 0 and embedding[length:].abs().max() == 0


@pytest.mark.parametrize("component,config_name,value,message", [
    ("scheduler", "scheduler_config.json", "EulerAncestralDiscreteScheduler", "is not a scheduler f3export runs"),
    ("text_encoder", "config.json", "BertModel", "is not a text_encoder f3export runs"),
    ("vae", "config.json", "AutoencoderKL", "is not a vae f3export runs"),
])
def test_a_folder_naming_a_part_the_family_cannot_run_is_refused_in_one_line(tmp_path, component, config_name,
                                                                             value, message):
    folder = write_cogvideox_pipeline(tmp_path / "pipe")
    index = json.loads((folder / "model_index.json").read_text())
    index[component][1] = value
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=message) as error:
        get_adapter("cogvideox").checkpoint.load_folder(folder)
    assert "\n" not in str(error.value) and value in str(error.value)


# --- the recipes' builds, deployed ------------------------------------------------------------------------------

def pipeline_recipe(tmp_path, family: str, folder) -> Path:
    """recipes/<family>-pipeline.toml on ``folder``, 3 steps, output under tmp_path."""
    text = (REPO / "recipes" / f"{family}-pipeline.toml").read_text()
    text = text.replace(f'path = "zoo/{family}-pipeline"', f'path = "{folder}"').replace("steps = 10", "steps = 3")
    recipe = tmp_path / f"{family}-pipeline.toml"
    recipe.write_text(text.replace('dir = "artifacts"', f'dir = "{tmp_path / "artifacts"}"'))
    return recipe


@pytest.fixture(scope="module", params=["cogvideox", "wan"])
def pipeline_build(request, tmp_path_factory):
    family = request.param
    tmp_path = tmp_path_factory.mktemp(f"{family}-build")
    result = run("build", pipeline_recipe(tmp_path, family, REPO / "zoo" / f"{family}-pipeline"), "--json")
    assert result.exit_code == 0, result.output
    return family, tmp_path / "artifacts" / f"{family}-pipeline", json.loads(result.stdout)


def test_a_pipeline_build_validates_in_video_space_through_the_3d_vae_with_real_text(pipeline_build):
    family, root, summary = pipeline_build
    pruning = json.loads((root / "validation.json").read_text())["metrics"]["pruning"]
    assert pruning["video_psnr_min"] > 20 and 0.9 < pruning["video_ssim_min"] <= 1
    assert len(pruning["per_run"][0]["video_psnr"]) == 9  # frames decoded: (3 latent frames - 1) x 4 + 1
    scores = json.loads((root / "scores.json").read_text())
    assert scores["text"].startswith({"cogvideox": "T5EncoderModel", "wan": "UMT5EncoderModel"}[family])
    assert scores["random_weights"] is True  # the tiny folder says so, and the report repeats it
    assert "**Random weights**" in (root / "report.md").read_text()
    components = json.loads((root / "manifest.json").read_text())["components"]
    assert components["vae_decoder"]["inputs"][0]["shape"] == [1, 4, 3, 8, 8]
    gates = {g["metric"]: g["passed"] for g in summary["gates"]}
    assert gates["export.vae_decoder.onnxruntime.rel_l2"] and gates["export.text_encoder.onnxruntime.rel_l2"]


def test_generate_writes_an_mp4_from_engines_alone_without_importing_torch(pipeline_build, tmp_path):
    import av

    family, root, _ = pipeline_build
    out = tmp_path / "clip.mp4"
    done = generate_without_torch(root, out, "--compare", "--steps", "3", "--scale", "2")
    height = FAMILIES[family][2]["height"]
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
    assert len(frames) == 9 and (stream.codec_context.name, stream.height) == ("h264", 2 * height)
    assert stream.width == 2 * (2 * height + 2)  # original | gap | pruned
    assert "decoded by the build's VAE decoder engine" in done.stdout
    assert 20 < float(done.stdout.split("PSNR ")[1].split(" dB")[0]) < 100


def test_engines_only_generation_equals_the_diffusers_pipeline_with_the_pruned_transformer(pipeline_build):
    """From the same noise, the engines (text encoder, pruned transformer, VAE decoder) and the NumPy sampler give
    the video diffusers' own pipeline gives with the build's pruned transformer as its transformer."""
    from f3export.generate import EnginePipeline

    family, root, _ = pipeline_build
    writer, pipeline_class, call = FAMILIES[family]
    engines = EnginePipeline(root)
    noise = np.random.default_rng(5).standard_normal((1, 4, 3, 8, 8), dtype=np.float32)
    dynamic = family == "cogvideox"
    clip = engines.sample("pruned", PROMPT, 5, 3, 6.0, NEGATIVE, dynamic, noise=noise)
    pipe = pipeline_class.from_pretrained(REPO / "zoo" / f"{family}-pipeline", local_files_only=True)
    pipe.transformer = pruned_denoiser(root)
    latents = torch.from_numpy(noise)
    theirs = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=6.0,
                  latents=latents.transpose(1, 2) if family == "cogvideox" else latents, output_type="np", **call,
                  **({"use_dynamic_cfg": True} if dynamic else {})).frames[0]
    ours = np.clip(clip.video / 2 + 0.5, 0, 1).transpose(1, 2, 3, 0)
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-4


def test_the_engine_stands_in_for_the_transformer_inside_the_diffusers_pipeline(pipeline_build):
    """diffusers' own pipeline with ``EngineDenoiser`` as its transformer gives the video it gives with the pruned
    PyTorch transformer (CogVideoX: latents frames-first, the rotary table passed and recomputed in the graph)."""
    family, root, _ = pipeline_build
    writer, pipeline_class, call = FAMILIES[family]
    pipe = pipeline_class.from_pretrained(REPO / "zoo" / f"{family}-pipeline", local_files_only=True)
    videos = []
    for transformer in (pruned_denoiser(root), EngineDenoiser(root)):
        pipe.register_modules(transformer=transformer)
        videos.append(pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=6.0,
                           generator=torch.Generator().manual_seed(4), output_type="np", **call).frames[0])
    assert relative_l2(torch.from_numpy(videos[1]), torch.from_numpy(videos[0])) < 1e-4
    with pytest.raises(TypeError, match="attention_mask"):
        EngineDenoiser(root)(torch.zeros(2, 4, 3, 8, 8), 1, torch.zeros(2, 8, 32), attention_mask=torch.ones(2))


@pytest.mark.parametrize("model_keys,error", [
    ("num_frames = 9\nheight = 32\nwidth = 32", None),
    ("num_frames = 10", "num_frames = 10: the VAE takes 1 + a multiple of 4 (its compression is 4x)"),
    ("height = 30", "height = 30: the VAE takes a multiple of 4"),
    ("num_frames = 9\nframes = 3", "num_frames and frames both set"),
])
def test_sizes_in_video_frames_and_pixels_map_to_latents_through_the_folders_vae(tmp_path, model_keys, error):
    from f3export.errors import RecipeError
    from f3export.recipe import load_recipe

    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\nfamily = "cogvideox"\npath = "{REPO / "zoo" / "cogvideox-pipeline"}"\n{model_keys}\n')
    if error is None:
        model = load_recipe(recipe).model
        assert (model.frames, model.latent_height, model.latent_width) == (3, 8, 8)
        return
    with pytest.raises(RecipeError, match=re.escape(error)):
        load_recipe(recipe)


def test_sizes_in_pixels_need_a_folder_with_a_vae(tmp_path):
    from f3export.errors import RecipeError
    from f3export.recipe import load_recipe

    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nfamily = "cogvideox"\npreset = "tiny"\nnum_frames = 9\n')
    with pytest.raises(RecipeError, match=r"num_frames: sizes in pixels need a model folder with a vae/"):
        load_recipe(recipe)


def test_a_text_encoder_larger_than_memory_is_refused_in_one_line_before_loading(tmp_path):
    folder = write_cogvideox_pipeline(tmp_path / "pipe")
    adapter = get_adapter("cogvideox")
    bundle = adapter.checkpoint.load_folder(folder)
    with open(folder / "text_encoder" / "model-00002-of-00002.safetensors", "wb") as shard:
        shard.truncate(2**42)  # 4 TiB, sparse: what its size says, nothing written
    with pytest.raises(CheckpointError, match=r"text_encoder: its weights alone need 4.0 TiB, more than the") as error:
        bundle.encode_text(["a dog"])
    assert "\n" not in str(error.value)


def test_embeddings_kept_on_disk_spare_a_later_run_the_encoder_and_a_bad_file_is_encoded_again(tmp_path):
    adapter = get_adapter("wan")
    folder = REPO / "zoo" / "wan-pipeline"
    first = adapter.checkpoint.load_folder(folder).encode_text
    first.keep_on_disk(tmp_path / "text", "files-key")
    made = first(["a dog", "a cat"])
    later = adapter.checkpoint.load_folder(folder).encode_text
    later.keep_on_disk(tmp_path / "text", "files-key")
    assert torch.equal(later(["a cat", "a dog"]), made.flip(0)) and later._encoder is None  # never loaded
    stored = sorted((tmp_path / "text").iterdir())
    assert len(stored) == 2
    stored[0].write_bytes(stored[0].read_bytes()[:-8] + bytes(8))  # a tensor that no longer hashes as recorded
    again = adapter.checkpoint.load_folder(folder).encode_text
    again.keep_on_disk(tmp_path / "text", "files-key")
    assert torch.equal(again(["a dog", "a cat"]), made) and again._encoder is not None
    other = adapter.checkpoint.load_folder(folder).encode_text
    other.keep_on_disk(tmp_path / "text", "other-files")  # another encoder's files: nothing of theirs is read
    other(["a dog"])
    assert len(list((tmp_path / "text").iterdir())) == 3


def test_engine_runner_serves_the_pipeline_components_by_their_recorded_io(pipeline_build):
    from f3export.runtime import EngineRunner

    family, root, _ = pipeline_build
    text = EngineRunner(root, "text_encoder")
    decoder = EngineRunner(root, "vae_decoder")
    assert [(t.name, t.rank) for t in text.inputs] == [("input_ids", 2)]
    embeddings = text(input_ids=np.zeros((1, {"cogvideox": 226, "wan": 512}[family]), dtype=np.int64))
    assert embeddings.shape[-1] == 32
    frames = decoder(latents=np.zeros((1, 4, 3, 8, 8), dtype=np.float32))
    assert frames.shape[:3] == (1, 3, 9)
