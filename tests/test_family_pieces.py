"""Families own their recipe keys, export I/O and evaluation protocol; the core reads them through one interface."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import f3export
from f3export.artifacts import staged_model
from f3export.engines.tensorrt import AxisRange, input_profile
from f3export.errors import CheckpointError, RecipeError
from f3export.export import export_onnx
from f3export.models import FAMILIES
from f3export.models.base import ExportIO, family_sources
from f3export.models.cogvideo_stage1 import CogVideoAdapter
from f3export.models.protocols import DiffusionRun, PromptRun
from f3export.models.tune_a_video import TuneAVideoAdapter
from f3export.recipe import Recipe, family_key, family_sections, load_recipe

from conftest import SMALL_SHAPE, TAV

FAMILY_NAMES = ("cogvideo", "tune-a-video", "latte", "animatediff", "modelscope", '"diffusers"')
FAMILY_KEYS = ("class_name", "temporal_modules", "text_per_frame", "tokens", "steps", "guidance_scale",
               "pruning_min_logit_cosine", "pruning_min_top1_agreement", "pruning_min_step_cosine",
               "pruning_min_latent_psnr")


# -- recipe keys ---------------------------------------------------------------------------------------------
def test_the_recipe_schema_names_no_family_and_no_family_key():
    source = (Path(f3export.__file__).parent / "recipe.py").read_text()
    found = [word for word in (*FAMILY_NAMES, *FAMILY_KEYS) if re.search(rf"\b{re.escape(word)}\b", source, re.I)]
    assert found == []


def test_each_family_reads_only_the_keys_it_declares():
    tav, cogvideo = family_sections("tune-a-video"), family_sections("cogvideo")
    fields = lambda section: list(section.__dataclass_fields__)
    assert fields(tav["calibration"]) == ["prompts", "seeds", "device", "sensitivity_batch", "steps",
                                          "guidance_scale", "negative_prompt", "source_videos"]
    # CogVideoX's pipeline has use_dynamic_cfg, Wan's has not
    assert "use_dynamic_cfg" in fields(family_sections("cogvideox")["validation"])
    assert "use_dynamic_cfg" not in fields(family_sections("wan")["validation"])
    assert fields(cogvideo["calibration"]) == ["prompts", "seeds", "device", "sensitivity_batch", "tokens"]
    assert fields(cogvideo["validation"])[-2:] == ["pruning_min_logit_cosine", "pruning_min_top1_agreement"]
    assert "class_name" not in fields(tav["model"]) and "class_name" in fields(family_sections("diffusers")["model"])


def test_another_familys_key_at_its_default_is_accepted_and_dropped(write_recipe):
    """What a manifest of an earlier version holds (every family's keys at their defaults) still opens."""
    recipe = load_recipe(write_recipe(), ["validation.pruning_min_logit_cosine=0.9"])
    assert "pruning_min_logit_cosine" not in recipe.section("validation")
    with pytest.raises(RecipeError) as refused:
        load_recipe(write_recipe(), ["validation.pruning_min_logit_cosine=0.5"])
    assert str(refused.value) == "fast.toml: [validation].pruning_min_logit_cosine does not apply to tune-a-video models"


def test_a_key_no_family_declares_is_unknown(write_recipe):
    with pytest.raises(RecipeError, match=r"^fast\.toml: \[validation\]: unknown key 'pruning_min_fid' \(known: "):
        load_recipe(write_recipe(), ["validation.pruning_min_fid=3.0"])


def test_a_new_family_key_is_declared_by_its_adapter_alone(write_recipe, monkeypatch):
    """Adding a family-specific key touches the family's adapter: the schema, checks and errors follow."""

    class Scaled(TuneAVideoAdapter):
        family = "scaled-tav"
        option_keys = (family_key("model", "motion_scale", float, 1.0, low=0.0),)

        def __init__(self, motion_scale: float = 1.0):
            self.motion_scale = motion_scale

    monkeypatch.setitem(FAMILIES, Scaled.family, Scaled)
    path = write_recipe()
    recipe = load_recipe(path, ['model.family="scaled-tav"', "model.motion_scale=2.5"])
    assert recipe.model.adapter_options == {"motion_scale": 2.5}
    assert Recipe.from_dict(recipe.source, recipe.as_dict()) == recipe  # the manifest's copy reads back the same
    with pytest.raises(RecipeError, match=r"^fast\.toml: \[model\]\.motion_scale = -1\.0 is out of range \[0\.0, inf\]$"):
        load_recipe(path, ['model.family="scaled-tav"', "model.motion_scale=-1.0"])
    with pytest.raises(RecipeError, match=r"^fast\.toml: \[model\]\.motion_scale applies only to family 'scaled-tav'$"):
        load_recipe(path, ["model.motion_scale=2.5"])


# -- export I/O and evaluation protocols -------------------------------------------------------------------
def test_the_export_io_declaration_gives_each_tensor_the_dynamic_axes_asked_for(tiny_model):
    spec = TAV.export_spec(tiny_model, SMALL_SHAPE, batch=2, dynamic=["batch", "frames"])
    assert spec.output_names == ["noise_pred"] and list(spec.inputs) == ["sample", "timestep", "encoder_hidden_states"]
    assert spec.dynamic_axes == {"sample": {0: "batch", 2: "frames"}, "timestep": {0: "batch"},
                                 "encoder_hidden_states": {0: "batch"}, "noise_pred": {0: "batch", 2: "frames"}}
    io = ExportIO({"tokens": {0: "batch"}}, {"logits": {0: "batch"}})
    assert io.spec({"tokens": torch.zeros(1, 3)}, dynamic=["frames"]).dynamic_axes == {}


def test_protocols_give_their_runs_and_calls(write_recipe):
    tav = load_recipe(write_recipe())
    runs = TAV.protocol.runs(tav.calibration)
    assert runs == [DiffusionRun("a man is skiing", 0, 3, 7.5)] and TAV.protocol.calls(tav.calibration) == 3
    assert runs[0].label() == {"prompt": "a man is skiing", "seed": 0}
    assert (TAV.protocol.batch, CogVideoAdapter.protocol.batch) == (2, 1)
    section = family_sections("cogvideo")["validation"](prompts=["a", "b"], seeds=[7])
    assert CogVideoAdapter.protocol.runs(section) == [PromptRun("a", 7), PromptRun("b", 7)]
    assert CogVideoAdapter.protocol.calls(section) == 1


# -- loading: a preset's identity is its family's whole code ------------------------------------------------
def test_a_presets_digest_covers_the_familys_network_and_checkpoint_modules():
    package = Path(f3export.__file__).parent / "models" / "tune_a_video"
    sources = family_sources(TuneAVideoAdapter())
    for module in ("network.py", "checkpoint.py", "adapter.py"):
        assert (package / module).read_text() in sources
    for shared in ("base.py", "loading.py", "structure.py"):  # the preset's weights are made there too
        assert (Path(f3export.__file__).parent / "models" / shared).read_text() in sources


# -- atomic model files and TensorRT profiles ---------------------------------------------------------------
def test_a_staged_model_appears_only_when_written_whole(tmp_path):
    target = tmp_path / "model.onnx"
    (tmp_path / "model.onnx.data").write_bytes(b"stale")
    with pytest.raises(OSError):
        with staged_model(target) as folder:
            (folder / target.name).write_bytes(b"half")
            raise OSError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx.data"]
    with staged_model(target) as folder:
        (folder / target.name).write_bytes(b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # the earlier data went with it
    assert target.read_bytes() == b"whole" and oct(target.stat().st_mode & 0o777) == "0o644"


def test_a_dynamic_axis_without_a_profile_range_is_one_line(tmp_path, tiny_model):
    spec = TAV.export_spec(tiny_model, SMALL_SHAPE, batch=2, dynamic=["batch", "frames"])
    info = export_onnx(tiny_model, spec, tmp_path / "m.onnx", opset=17, external_data="never")
    with pytest.raises(CheckpointError) as refused:
        input_profile(info.path, {"batch": AxisRange(1, 2, 2)})
    assert str(refused.value) == (f"{info.path}: input 'sample' has dynamic axis 'frames', which has no profile "
                                  "range (ranges: batch)")
