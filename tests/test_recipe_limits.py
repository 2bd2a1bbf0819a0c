"""Values a recipe or checkpoint can hold that no build can use are refused up front: one line, exit 2.

Non-finite numbers, shapes one forward of which cannot fit this machine, patterns that match no module,
keys no selected backend reads, unusable output names, and checkpoint configs of the wrong types.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
import typing

import pytest

from f3export.build import Build
from f3export.errors import CheckpointError, RecipeError
from f3export.models import get_adapter
from f3export.models.base import VideoShape
from f3export.models.cogvideo_stage1 import CogVideoAdapter
from f3export.recipe import family_sections, load_recipe

from conftest import FAST_RECIPE, ORIGINAL_STYLE_CONFIG, TAV, run, write_checkpoint

MiB = 2**20


def cli(*args):
    return subprocess.run([sys.executable, "-m", "f3export", *map(str, args)], capture_output=True, text=True)


def only_line(done) -> str:
    """The single line a refused command prints (exit 2, nothing else, no traceback)."""
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


# -- non-finite numbers ------------------------------------------------------------------------------------
FLOAT_KEYS = [(name, f.name) for name, section in family_sections("tune-a-video").items()  # FAST_RECIPE's family
              for f in dataclasses.fields(section)  # a number, an optional one, or one that also takes a word
              for hint in [typing.get_type_hints(section)[f.name]]
              if float in (hint, *typing.get_args(hint)) and typing.get_origin(hint) is not list]
FLOAT_LIST_KEYS = [(name, f.name) for name, section in family_sections("tune-a-video").items()
                   for f in dataclasses.fields(section) if typing.get_type_hints(section)[f.name] == list[float]]


def test_the_float_keys_are_all_found():
    """The family's keys (guidance_scale, its gates' limits) with those of every family."""
    assert ("calibration", "guidance_scale") in FLOAT_KEYS and ("pruning", "ratio") in FLOAT_KEYS
    assert ("validation", "pruning_min_latent_psnr") in FLOAT_KEYS and ("validation", "pruning_min_video_psnr") \
        in FLOAT_KEYS and ("validation", "pruning_max_task_drop") in FLOAT_KEYS and len(FLOAT_KEYS) == 12


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("section, key", FLOAT_LIST_KEYS)
def test_every_float_list_key_refuses_a_non_finite_item(write_recipe, section, key, value):
    assert FLOAT_LIST_KEYS == [("pruning", "pruned_steps"), ("pruning", "search_steps")]
    with pytest.raises(RecipeError) as refused:
        load_recipe(write_recipe(), [f"{section}.{key}=[0.0, {value}]"])
    assert str(refused.value) == f"fast.toml: [{section}].{key}[1] = {value} is not a finite number"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("section, key", FLOAT_KEYS)
def test_every_float_key_refuses_a_non_finite_number(write_recipe, section, key, value):
    with pytest.raises(RecipeError) as refused:
        load_recipe(write_recipe(), [f"{section}.{key}={value}"])
    assert str(refused.value) == f"fast.toml: [{section}].{key} = {value} is not a finite number"


def test_nan_guidance_in_the_recipe_file_is_one_line_exit_2(write_recipe):
    path = write_recipe(FAST_RECIPE.replace("steps = 3\n\n[pruning]", "steps = 3\nguidance_scale = nan\n\n[pruning]"))
    result = run("build", path)
    assert result.exit_code == 2
    assert result.output == "error: fast.toml: [calibration].guidance_scale = nan is not a finite number\n"
    assert not (path.parent / "artifacts").exists()


def test_a_float_too_large_for_a_double_is_not_finite_either(write_recipe):
    with pytest.raises(RecipeError, match=r"^fast\.toml: \[pruning\]\.ratio = inf is not a finite number$"):
        load_recipe(write_recipe(FAST_RECIPE.replace("ratio = 0.5", "ratio = 1" + "0" * 400)))


# -- keys no selected backend reads ------------------------------------------------------------------------
@pytest.mark.parametrize("engine, key, value, reader, selected", [
    ('precision = "fp16"', "precision", "'fp16'", "'tensorrt'", "'onnxruntime'"),
    ('backend = "onnxruntime"\nbuilder_optimization_level = 5', "builder_optimization_level", "5", "'tensorrt'",
     "'onnxruntime'"),
    ("fp32_norms = false", "fp32_norms", "False", "'tensorrt'", "'onnxruntime'"),
    ('backend = "tensorrt"\ndevice = "cuda"', "device", "'cuda'", "'onnxruntime'", "'tensorrt'"),
    ('backends = ["tensorrt"]\noptimization_level = "all"', "optimization_level", "'all'", "'onnxruntime'",
     "'tensorrt'"),
])
def test_a_key_no_selected_backend_reads_is_refused(write_recipe, engine, key, value, reader, selected):
    path = write_recipe(FAST_RECIPE.replace("[output]", f"[engine]\n{engine}\n\n[output]"))
    with pytest.raises(RecipeError) as refused:
        load_recipe(path)
    assert str(refused.value) == (f"fast.toml: [engine].{key} = {value} is read only by {reader}, which the recipe "
                                  f"does not select (it selects {selected})")


def test_keys_of_a_selected_backend_and_the_validated_ranges_are_accepted(write_recipe):
    both = 'backends = ["onnxruntime", "tensorrt"]\nprecision = "fp32"\ndevice = "cpu"\nprofile_batch = [1, 2, 4]'
    recipe = load_recipe(write_recipe(FAST_RECIPE.replace("[output]", f"[engine]\n{both}\n\n[output]")))
    assert recipe.engine.precision == "fp32" and recipe.engine.profile_batch == [1, 2, 4]
    # profile_* is the validated range of every backend, ONNX Runtime included
    ranges = load_recipe(write_recipe(FAST_RECIPE.replace("[output]", "[engine]\nprofile_frames = [2, 4, 4]\n\n"
                                                                       "[output]")))
    assert ranges.engine.selected == ["onnxruntime"]


def test_a_backend_key_set_on_the_command_line_counts_as_set(write_recipe):
    with pytest.raises(RecipeError, match=r"\[engine\]\.precision = 'bf16' is read only by 'tensorrt'"):
        load_recipe(write_recipe(), ["engine.precision=bf16"])


# -- file and folder names ---------------------------------------------------------------------------------
@pytest.mark.parametrize("toml_name, shown, problem", [
    (r'"a\u0000b"', r"'a\x00b'", "it contains a NUL byte"),
    (r'"a\tb"', r"'a\tb'", "it contains a control character"),
    ('"a/b"', "'a/b'", "it contains a path separator"),
    ('".."', "'..'", "empty, '.' or '..'"),
    ('"' + "é" * 128 + '"', repr("é" * 80) + "... (128 characters)", "256 bytes in UTF-8, more than 255"),
])
def test_an_unusable_output_name_is_refused(write_recipe, toml_name, shown, problem):
    path = write_recipe(FAST_RECIPE.replace('dir = "{out}"', f'dir = "{{out}}"\nname = {toml_name}'))
    with pytest.raises(RecipeError) as refused:
        load_recipe(path)
    assert str(refused.value) == f"fast.toml: [output].name = {shown} is not a usable folder name ({problem})"


def test_unusable_paths_are_refused_before_the_file_system_sees_them(write_recipe):
    with pytest.raises(RecipeError) as refused:
        load_recipe(write_recipe(FAST_RECIPE.replace('dir = "{out}"', r'dir = "out\u0000put"')))
    assert str(refused.value) == r"fast.toml: [output].dir = 'out\x00put' is not a usable path (it contains a NUL byte)"
    long = "m" * 300
    with pytest.raises(RecipeError) as refused:
        load_recipe(write_recipe(FAST_RECIPE.replace('preset = "tiny"', f'path = "models/{long}"')))
    assert str(refused.value) == (f"fast.toml: [model].path = {'models/' + long[:73]!r}... (307 characters) is not a "
                                  f"usable path (the component {long[:20]!r}... (300 characters) is 300 bytes in "
                                  "UTF-8, more than 255)")


def test_a_nul_byte_in_the_name_is_one_line_exit_2(write_recipe):
    path = write_recipe(FAST_RECIPE.replace('dir = "{out}"', 'dir = "{out}"\nname = "x\\u0000y"'))
    result = run("build", path)
    assert result.exit_code == 2
    assert result.output == r"error: fast.toml: [output].name = 'x\x00y' is not a usable folder name (it contains " \
                            "a NUL byte)\n"


# -- shapes that cannot fit this machine ---------------------------------------------------------------------
def test_a_huge_in_range_shape_is_refused_quickly_before_any_work(write_recipe):
    path = write_recipe()
    start = time.process_time()  # this process's CPU seconds: the work done, however busy the machine
    result = run("build", path, "--set", "model.frames=1024", "--set", "model.latent_height=512",
                 "--set", "model.latent_width=512")
    assert time.process_time() - start < 20 and result.exit_code == 2
    line = result.output.strip()
    # The sparse-causal self-attention's probabilities: [2 x 1024 frames, 8 heads, 512^2 queries, 2 x 512^2 keys]
    # float32 = 2^53 bytes = 8 PiB, held together with the scores they come from: 16 PiB.
    assert line.startswith("error: fast.toml: [model].frames x latent_height x latent_width = 1024x512x512 at "
                           "[export].batch = 2 needs at least 16.0 PiB for one forward (largest activation 8.0 PiB), "
                           "more than the ")
    assert line.endswith(" available")
    assert not (path.parent / "artifacts").exists()


@pytest.fixture
def eight_mib(monkeypatch):
    """This machine, as far as f3export can tell, has 8 MiB free: the tiny preset's 5.9 MiB of weights fit."""
    monkeypatch.setattr("f3export.models.memory.available_memory_bytes", lambda: 8 * MiB)


# TAV tiny at 4x8x8, batch 2: its largest tensor is the sparse-causal attention's probabilities,
# [2 x 4 frames, 8 heads, 64 queries, 128 keys] float32 = 2 MiB, held with the scores: 4 MiB + 5.9 MiB weights.
TINY_FORWARD = "needs at least 10 MiB for one forward (largest activation 2 MiB), more than the 8 MiB available"


def test_a_shape_whose_forward_cannot_fit_is_refused(write_recipe, eight_mib):
    result = run("build", write_recipe())
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == ("error: fast.toml: [model].frames x latent_height x latent_width = 4x8x8 at "
                                     f"[export].batch = 2 {TINY_FORWARD}")


def test_the_guidance_batch_of_2_is_sized_even_when_the_export_batch_is_1(write_recipe, eight_mib):
    result = run("build", write_recipe(), "--set", "export.batch=1")
    assert result.exit_code == 2
    assert result.output.strip() == ("error: fast.toml: [model].frames x latent_height x latent_width = 4x8x8 at "
                                     f"batch 2 (calibration and validation runs) {TINY_FORWARD}")


def test_a_huge_export_batch_is_refused(write_recipe, monkeypatch):
    monkeypatch.setattr("f3export.models.memory.available_memory_bytes", lambda: 16 * 2**30)
    result = run("build", write_recipe(), "--set", "export.batch=100000")
    assert result.exit_code == 2
    assert result.output.strip() == ("error: fast.toml: [model].frames x latent_height x latent_width = 4x8x8 at "
                                     "[export].batch = 100000 needs at least 195.3 GiB for one forward (largest "
                                     "activation 97.7 GiB), more than the 16.0 GiB available")


@pytest.fixture(scope="module")
def modelscope_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("modelscope")
    get_adapter("modelscope").checkpoint.load_preset("tiny", seed=1).model.inner.save_pretrained(folder / "unet")
    return folder


SIZED = [("tune-a-video", VideoShape(4, 8, 8)), ("modelscope", VideoShape(4, 8, 8)),
         ("animatediff", VideoShape(4, 8, 8)), ("latte", VideoShape(8, 8, 8)), ("cogvideo", VideoShape(5, 8, 8)),
         ("diffusers", VideoShape(4, 8, 8))]


@pytest.mark.parametrize("family, shape", SIZED, ids=[f for f, _ in SIZED])
def test_every_family_is_sized_by_a_forward_on_the_meta_device(family, shape, modelscope_folder):
    if family == "diffusers":
        adapter = get_adapter(family, {"class_name": "UNet3DConditionModel",
                                       "temporal_modules": ["*temp_attentions.*.attn[12]"], "text_per_frame": False})
        preset, path = None, str(modelscope_folder)
    else:
        adapter, preset, path = get_adapter(family), "tiny", None
    memory = adapter.forward_memory(adapter.checkpoint.skeleton(preset, path), shape, batch=2)
    # Independently: the real network's output at this shape is one tensor the forward must make.
    checkpoint = adapter.checkpoint
    real = (checkpoint.load_preset(preset, 0) if preset else checkpoint.load_folder(modelscope_folder)).model
    inputs = adapter.export_spec(real, shape, 2, dynamic=[]).inputs
    output = real(*inputs.values())
    assert memory.largest_activation >= output.numel() * output.element_size()
    assert memory.weights == sum(p.numel() * p.element_size() for p in real.parameters()) + \
        sum(b.numel() * b.element_size() for b in real.buffers())
    assert memory.working_set >= memory.largest_activation


def test_a_checkpoint_whose_weights_exceed_memory_is_refused_before_allocating(write_recipe, modelscope_folder,
                                                                                monkeypatch):
    monkeypatch.setattr("f3export.models.memory.available_memory_bytes", lambda: MiB)
    recipe = FAST_RECIPE.replace('family = "tune-a-video"\npreset = "tiny"', f'family = "modelscope"\n'
                                 f'path = "{modelscope_folder}"')
    result = run("build", write_recipe(recipe))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == (f"error: {modelscope_folder}: the weights its config describes alone need 5 MiB, "
                                     "more than the 1 MiB of memory available on this machine")


# -- patterns that match no module ---------------------------------------------------------------------------
def test_a_keep_pattern_that_matches_nothing_names_a_real_module(tmp_path):
    recipe = tmp_path / "animatediff.toml"
    recipe.write_text(open("recipes/animatediff.toml").read().replace('dir = "artifacts"', f'dir = "{tmp_path}"'))
    result = run("build", recipe, "--set", "pruning.keep=['unet.*', 'mid_block.*']")
    assert result.exit_code == 2
    assert result.output.strip() == ("error: animatediff.toml: [pruning].keep: pattern 'mid_block.*' matches no "
                                     "temporal module (e.g. 'unet.down_blocks.0.motion_modules.0.transformer_blocks"
                                     ".0.attn1')")
    assert list(tmp_path.iterdir()) == [recipe]


def test_a_keep_pattern_that_matches_is_accepted(write_recipe):
    assert Build(load_recipe(write_recipe(), ["pruning.keep=['*up_blocks.1.*']"])).recipe.pruning.keep


def test_a_temporal_modules_pattern_that_matches_nothing_names_a_real_attention(write_recipe, modelscope_folder):
    recipe = FAST_RECIPE.replace('family = "tune-a-video"\npreset = "tiny"', (
        f'family = "diffusers"\npath = "{modelscope_folder}"\nclass_name = "UNet3DConditionModel"\n'
        'temporal_modules = ["*temp_attentions.*.attn[12]", "*temporal_attn*"]'))
    with pytest.raises(RecipeError) as refused:
        Build(load_recipe(write_recipe(recipe)))
    assert str(refused.value) == ("fast.toml: [model].temporal_modules: pattern '*temporal_attn*' matches no "
                                  "Attention module (e.g. 'transformer_in.transformer_blocks.0.attn1')")


# -- checkpoint configs of the wrong types ---------------------------------------------------------------------
@pytest.mark.parametrize("key, value, problem", [
    ("block_out_channels", "64", "block_out_channels = '64' is not of type list[int]"),
    ("attention_head_dim", 0, "attention_head_dim = 0 must be at least 1"),
    ("layers_per_block", -1, "layers_per_block = -1 must be at least 1"),
    ("norm_num_groups", 0, "norm_num_groups = 0 must be at least 1"),
    ("cross_attention_dim", "32", "cross_attention_dim = '32' is not of type int"),
    ("norm_eps", None, "norm_eps = None is not of type float"),
    ("norm_num_groups", 7, "block_out_channels[0] = 32 is not a multiple of norm_num_groups = 7"),
    ("down_block_types", [], "block_out_channels and the block type lists differ in length"),
])
def test_a_tune_a_video_config_of_wrong_types_names_file_and_key(tmp_path, tiny_model, key, value, problem):
    write_checkpoint(tmp_path, tiny_model, "safetensors", {**ORIGINAL_STYLE_CONFIG, key: value})
    with pytest.raises(CheckpointError) as refused:
        TAV.checkpoint.load_folder(tmp_path)
    assert str(refused.value) == f"{tmp_path / 'unet' / 'config.json'}: {problem}"


@pytest.mark.parametrize("key, value, problem", [
    ("num_layers", 0, "num_layers = 0 must be at least 1"),
    ("hidden_size", "64", "hidden_size = '64' is not of type int"),
    ("layout", [8, 8, 328], "layout [8, 8, 328] must be increasing: text < text + frame <= text + frames x frame"),
    ("layout", "8, x, 328", "layout = '8, x, 328' is not comma-separated integers"),
    ("layernorm_epsilon", float("nan"), "layernorm_epsilon = nan is not a finite number"),
    ("additional_seqlen", 10, "additional_seqlen = 10 is too small for this layout (needs at least 256)"),
])
def test_a_cogvideo_sat_config_of_wrong_types_names_file_and_key(tmp_path, key, value, problem):
    adapter = CogVideoAdapter()
    (tmp_path / "model_config.json").write_text(json.dumps({**adapter.checkpoint.presets["tiny"], key: value}))
    with pytest.raises(CheckpointError) as refused:
        adapter.checkpoint.folder_config(tmp_path)
    assert str(refused.value) == f"{tmp_path / 'model_config.json'}: {problem}"


@pytest.mark.parametrize("key, value, problem", [
    ("block_out_channels", "64", "block_out_channels = '64' is not of type list[int]"),
    ("layers_per_block", -1, "layers_per_block = -1 must be at least 0"),
    ("norm_num_groups", 0, "UNet3DConditionModel cannot be built from it (ZeroDivisionError: integer modulo by zero)"),
    ("cross_attention_dim", "32", "cross_attention_dim = '32' is not of type int"),
])
def test_a_diffusers_config_of_wrong_types_names_file_and_key(tmp_path, modelscope_folder, key, value, problem):
    (tmp_path / "unet").mkdir()
    config = json.loads((modelscope_folder / "unet" / "config.json").read_text())
    (tmp_path / "unet" / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(CheckpointError) as refused:
        get_adapter("modelscope").checkpoint.folder_config(tmp_path)
    assert str(refused.value) == f"{tmp_path / 'unet' / 'config.json'}: {problem}"


def test_a_broken_checkpoint_config_is_one_line_exit_2_from_the_cli(tmp_path, tiny_model, write_recipe):
    write_checkpoint(tmp_path / "model", tiny_model, "safetensors", {**ORIGINAL_STYLE_CONFIG, "attention_head_dim": 0})
    path = write_recipe(FAST_RECIPE.replace('preset = "tiny"', f'path = "{tmp_path / "model"}"'))
    assert only_line(cli("build", path)) == \
        f"error: {tmp_path / 'model' / 'unet' / 'config.json'}: attention_head_dim = 0 must be at least 1"
