"""Deployment: engines-only generation, a Triton repository, diffusers pipelines over the pruned model and the
engine, and bench from the build folder alone."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from diffusers import AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from f3export.dropin import EngineDenoiser, pruned_denoiser
from f3export.models import get_adapter
from f3export.scheduling import DDIM
from f3export.validate import load_goldens

from conftest import run
from test_families import CUSTOM_RECIPE

REPO = Path(__file__).resolve().parents[1]
# Run the CLI with every import of torch refused: generation must not need it.
NO_TORCH = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("generate imported " + name)
sys.meta_path.insert(0, Refuse())
from f3export.cli import main
main(sys.argv[1:])
"""


def generate_without_torch(root, out, *options: str) -> subprocess.CompletedProcess:
    """``f3export generate`` in a process that refuses every import of torch (it must succeed)."""
    done = subprocess.run([sys.executable, "-c", NO_TORCH, "generate", str(root), "--prompt", "a dog is running",
                           *options, "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done


def test_generate_writes_a_gif_from_engines_alone_without_importing_torch(built, tmp_path):
    _, root, _ = built
    out = tmp_path / "clip.gif"
    done = generate_without_torch(root, out, "--compare", "--steps", "3", "--scale", "2")
    with Image.open(out) as gif:
        assert gif.n_frames == 4  # the recipe's frames
        assert gif.size == (2 * (8 + 2 + 8), 2 * 8)  # original | gap | pruned, latents 8 x 8 at scale 2
    assert "written:" in done.stdout and "original (left) vs pruned (right): PSNR" in done.stdout
    psnr = float(done.stdout.split("PSNR ")[1].split(" dB")[0])
    assert 5 < psnr < 100  # pruned differs from the original, but not by everything


def test_generate_refuses_an_unwritable_format_in_one_line(built, tmp_path):
    _, root, _ = built
    result = run("generate", root, "--prompt", "x", "--out", tmp_path / "clip.avi")
    assert result.exit_code == 2 and "clip.avi: write one of .gif, .webp, .png, .mp4" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("config", [
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "set_alpha_to_one": False,
     "steps_offset": 1},
    {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    {"beta_schedule": "linear", "timestep_spacing": "linspace", "clip_sample": True, "prediction_type": "sample"},
])
def test_the_numpy_ddim_steps_as_diffusers_ddim_scheduler(config):
    reference = DDIMScheduler(**config)
    ours = DDIM(dict(reference.config))
    reference.set_timesteps(7)
    ours.set_timesteps(7)
    assert list(ours.timesteps) == reference.timesteps.tolist()
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 4, 2, 4, 4), dtype=np.float32)
    expected = torch.from_numpy(latents.copy())
    for t in ours.timesteps:
        output = rng.standard_normal(latents.shape, dtype=np.float32)
        latents = ours.step(output, int(t), latents)
        expected = reference.step(torch.from_numpy(output), int(t), expected).prev_sample
    np.testing.assert_allclose(latents, expected.numpy(), rtol=1e-5, atol=2e-5)


def test_a_triton_repository_agrees_with_the_engines_it_holds(built, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    _, root, _ = built
    repo = tmp_path / "triton"
    result = run("export-triton", root, repo)
    assert result.exit_code == 0, result.output
    manifest = json.loads((root / "manifest.json").read_text())
    assert sorted(p.name for p in repo.iterdir()) == ["fast_original", "fast_pruned"]
    types = {onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32}
    for variant in ("original", "pruned"):
        folder = repo / f"fast_{variant}"
        config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.name == folder.name and config.platform == "onnxruntime_onnx" and config.max_batch_size == 0
        engine = root / manifest["engines"][f"{variant}.onnxruntime"]["path"]
        model_file = folder / "1" / "model.onnx"
        assert hashlib.sha256(model_file.read_bytes()).digest() == hashlib.sha256(engine.read_bytes()).digest()
        graph = onnx.load(str(model_file)).graph
        for declared, actual in ((config.input, graph.input), (config.output, graph.output)):
            actual = [t for t in actual if t.name in {d.name for d in declared}] if declared is config.input \
                else list(actual)
            assert [d.name for d in declared] == [t.name for t in actual]
            for d, t in zip(declared, actual):
                assert d.data_type == types[t.type.tensor_type.elem_type]
                onnx_dims = [x.dim_value if x.HasField("dim_value") else -1 for x in t.type.tensor_type.shape.dim]
                # validated at one size each (the recipe sets no profile ranges): every dim is fixed
                assert list(d.dims) == [2, 4, 4, 8, 8] if d.name in ("sample", "noise_pred") else len(d.dims) >= 1
                assert len(d.dims) == len(onnx_dims)
                assert all(o in (-1, v) for o, v in zip(onnx_dims, d.dims))
        # the repository's model runs on the build's own goldens
        inputs, expected = load_goldens(root / f"goldens/{variant}.npz")[0]
        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        got = session.run(None, inputs)[0]
        np.testing.assert_allclose(got, expected["noise_pred"], rtol=1e-4, atol=1e-5)
    again = run("export-triton", root, repo)
    assert again.exit_code == 1 or again.exit_code == 2
    assert "exists" in again.output


# The custom-family test's recipe, as a ModelScope model read from a folder.
MODELSCOPE_RECIPE = CUSTOM_RECIPE.replace(
    'family = "diffusers"\nclass_name = "UNet3DConditionModel"\ntemporal_modules = ["*temp_attentions.*.attn[12]"]\n',
    'family = "modelscope"\n')
assert 'family = "modelscope"' in MODELSCOPE_RECIPE


def folder_build(base: Path, family: str) -> Path:
    """A build of ``family``'s tiny network read from a model folder on disk (not a preset)."""
    network = get_adapter(family).checkpoint.load_preset("tiny", seed=1).model.inner
    network.save_pretrained(base / "model" / "unet")
    recipe = base / f"{family}.toml"
    recipe.write_text(MODELSCOPE_RECIPE.replace('family = "modelscope"', f'family = "{family}"')
                      .replace("{model}", str(base / "model")).replace("{out}", str(base / "out")))
    result = run("build", recipe)
    assert result.exit_code == 0, result.output
    return base / "out" / family


@pytest.fixture(scope="module")
def modelscope_build(tmp_path_factory):
    base = tmp_path_factory.mktemp("modelscope")
    return base, folder_build(base, "modelscope")


def tiny_pipeline_parts() -> dict:
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(REPO / "zoo" / "tav-shapes" / "tokenizer", model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                                num_hidden_layers=2, vocab_size=tokenizer.vocab_size,
                                                max_position_embeddings=77)).eval()
    vae = AutoencoderKL(block_out_channels=[8, 8], norm_num_groups=8, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2).eval()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "scheduler": scheduler}


def sample(pipe) -> torch.Tensor:
    return pipe("a dog is running", num_frames=4, height=16, width=16, num_inference_steps=3,
                generator=torch.Generator().manual_seed(0), output_type="latent").frames


@pytest.mark.parametrize("family, pipeline, network", [
    ("modelscope", TextToVideoSDPipeline, "UNet3DConditionModel"),
    ("animatediff", AnimateDiffPipeline, "UNetMotionModel"),
])
def test_a_diffusers_pipeline_runs_the_pruned_model_and_its_engine(family, pipeline, network, modelscope_build,
                                                                   tmp_path):
    root = modelscope_build[1] if family == "modelscope" else folder_build(tmp_path, family)
    parts = tiny_pipeline_parts()
    pruned = pruned_denoiser(root)
    assert type(pruned).__name__ == network
    pipe = pipeline(unet=pruned, **parts, **({"motion_adapter": None} if pipeline is AnimateDiffPipeline else {}))
    with torch.no_grad():
        from_model = sample(pipe)
        pipe.register_modules(unet=EngineDenoiser(root))
        from_engine = sample(pipe)
    assert from_model.shape == (1, 4, 4, 8, 8)  # latents [batch, channels, frames, h, w]
    rel = (from_engine - from_model).norm() / from_model.norm()
    assert rel < 1e-4, rel  # the engine is the pruned model, to fp32 rounding, inside diffusers' own loop


def test_the_engine_denoiser_refuses_arguments_it_would_ignore(modelscope_build):
    _, root = modelscope_build
    denoiser = EngineDenoiser(root)
    with pytest.raises(TypeError, match="added_cond_kwargs"):
        denoiser(torch.zeros(2, 4, 4, 8, 8), 1, torch.zeros(2, 77, 32), added_cond_kwargs={"x": 1})


def test_bench_runs_from_the_build_folder_with_the_source_checkpoint_moved_away(modelscope_build, tmp_path):
    base, root = modelscope_build
    work = tmp_path / "modelscope"
    shutil.copytree(root, work)
    (work / "bench" / "ratios" / "0.5").mkdir(parents=True)  # a last bench's results, to be replaced
    (work / "bench.png").write_bytes(b"stale")
    moved = tmp_path / "elsewhere"
    shutil.move(base / "model", moved)
    try:
        result = run("bench", work, "--runs", "2", "--warmup", "1", "--json")
    finally:
        shutil.move(moved, base / "model")
    assert result.exit_code == 0, result.output
    bench = json.loads(result.stdout)
    assert bench == json.loads((work / "bench.json").read_text())
    assert bench["models"]["original"]["flops"] > bench["models"]["pruned"]["flops"] > 0
    assert not (work / "bench.png").exists() and not (work / "bench" / "ratios").exists()  # no stale results
    spread = bench["backends"]["onnxruntime"]["speedup_spread"]
    assert spread["pairs"] == 2 and spread["q1"] <= spread["median"] <= spread["q3"]


def test_a_folder_with_text_encoder_and_vae_deploys_them_and_generates_from_engines_alone(tmp_path, tiny_bundle):
    """The rest of the pipeline goes with the denoiser: the CLIP text encoder and the VAE decoder are exported,
    built and checked against PyTorch; generate tokenizes with tokenizer.json, decodes with the VAE engine."""
    from transformers import CLIPTokenizer

    from conftest import ORIGINAL_STYLE_CONFIG, FAST_RECIPE, TAV, write_checkpoint, write_clip

    model = tmp_path / "model"
    write_checkpoint(model, tiny_bundle.model, "safetensors", ORIGINAL_STYLE_CONFIG)
    write_clip(model, 32)
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=[8, 8], norm_num_groups=8, latent_channels=4,
                  down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2).save_pretrained(model / "vae")
    recipe = tmp_path / "fast.toml"
    recipe.write_text(FAST_RECIPE.replace('preset = "tiny"', f'path = "{model}"').replace("steps = 3", "steps = 2")
                      .replace("{out}", str(tmp_path / "artifacts")))
    result = run("build", recipe, "--json")
    assert result.exit_code == 0, result.output
    root = tmp_path / "artifacts" / "fast"
    manifest = json.loads((root / "manifest.json").read_text())
    components = manifest["components"]
    assert components["text_encoder"]["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", 77]}
    assert components["vae_decoder"]["outputs"][0]["shape"] == ["frames", 3, 16, 16]  # 8 x 8 latents, VAE scale 2
    gates = {g["metric"]: g for g in json.loads(result.stdout)["gates"]}
    for name in ("text_encoder", "vae_decoder"):
        assert gates[f"export.{name}.onnxruntime.rel_l2"]["passed"], gates[f"export.{name}.onnxruntime.rel_l2"]
    checked = json.loads(run("check", root, "--json").stdout)  # their engines re-run on their goldens
    assert {g["metric"] for g in checked["gates"]} >= {"check.text_encoder.onnxruntime.rel_l2",
                                                       "check.vae_decoder.onnxruntime.rel_l2"}
    assert checked["passed"] is True
    # the runtime tokenizer (tokenizers, no torch) gives the build's CLIPTokenizer ids
    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(str(root / components["text_encoder"]["tokenizer"]))
    slow = CLIPTokenizer.from_pretrained(model / "tokenizer")
    for prompt in ("a dog is running", "", "x" * 200):
        assert fast.encode(prompt).ids == slow(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    out = tmp_path / "clip.gif"
    done = generate_without_torch(root, out, "--steps", "2", "--scale", "1")
    assert "decoded by the build's VAE decoder engine" in done.stdout
    with Image.open(out) as gif:
        assert gif.n_frames == 4 and gif.size == (16, 16)
    assert TAV.family == manifest["contract"]["family"]
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    assert run("export-triton", root, tmp_path / "triton").exit_code == 0
    text = text_format.Parse((tmp_path / "triton" / "fast_text_encoder" / "config.pbtxt").read_text(),
                             model_config_pb2.ModelConfig())
    assert [(t.name, t.data_type, list(t.dims)) for t in text.input] == \
        [("input_ids", model_config_pb2.TYPE_INT64, [-1, 77])]
    assert (tmp_path / "triton" / "fast_vae_decoder" / "1" / "model.onnx").is_file()


def test_generate_samples_as_the_pytorch_sampler_does_from_the_same_noise(built):
    """The engines-only loop against an oracle: diffusers' DDIMScheduler driving the pruned PyTorch model, from
    the same initial noise and the embeddings the build calibrated with (the stand-in, equal to the adapter's)."""
    from f3export.generate import EnginePipeline
    from f3export.prune import load_pruned

    _, root, _ = built
    prompt, seed, steps, guidance = "a dog is running", 3, 3, 7.5
    pipeline = EnginePipeline(root)
    clip = pipeline.sample("pruned", prompt, seed, steps, guidance)
    adapter, _, model = load_pruned(root / "pruned")
    context = torch.from_numpy(np.concatenate([pipeline.embed(""), pipeline.embed(prompt)]))
    assert torch.equal(context, adapter.encode_prompts(adapter.checkpoint.load_preset("tiny", 0), ["", prompt]))
    conventions = json.loads((root / "manifest.json").read_text())["contract"]["conventions"]
    scheduler = DDIMScheduler.from_config(conventions["scheduler"]["config"])
    scheduler.set_timesteps(steps)
    latents = torch.from_numpy(np.random.default_rng(seed).standard_normal(clip.latents.shape, dtype=np.float32))
    with torch.no_grad():
        for t in scheduler.timesteps:
            uncond, cond = model(torch.cat([latents, latents]), t.float().expand(2), context).chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    rel = np.linalg.norm(clip.latents - latents.numpy()) / np.linalg.norm(latents.numpy())
    assert rel < 1e-4, rel


def test_token_ids_on_a_diffusion_build_say_it_has_no_step_engine(built, tmp_path):
    _, root, _ = built
    result = run("generate", root, "--out", tmp_path / "t.npy", "--token-ids", "1")
    assert result.exit_code == 2
    assert result.output.startswith("error: --token-ids samples image tokens with a build's step engine, and this "
                                    "'tune-a-video' build has none")
