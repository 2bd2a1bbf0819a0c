"""The NumPy samplers (f3export.scheduling) step as diffusers' own schedulers do: the same timesteps, and from the
same latents and model outputs (random) the same latents after every step; what a port does not implement is
refused in one line naming it. The DDIM port's test is in test_deploy.py, next to the generate it serves."""

from __future__ import annotations

import subprocess
import sys

import diffusers.schedulers.scheduling_dpm_cogvideox as cogvideox_dpm
import numpy as np
import pytest
import torch
from diffusers import (CogVideoXDDIMScheduler, CogVideoXDPMScheduler, FlowMatchEulerDiscreteScheduler,
                       UniPCMultistepScheduler)

from f3export.errors import Unsupported
from f3export.scheduling import numpy_sampler

COGVIDEOX_2B = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                "set_alpha_to_one": True, "snr_shift_scale": 3.0, "steps_offset": 0, "timestep_spacing": "trailing"}
COGVIDEOX = {
    "2b": COGVIDEOX_2B,
    "5b": {**COGVIDEOX_2B, "snr_shift_scale": 1.0},
    # no rescaling, leading spacing with an offset, alphas_cumprod[0] at the end, x0 never clipped
    "epsilon-leading": {**COGVIDEOX_2B, "prediction_type": "epsilon", "rescale_betas_zero_snr": False,
                        "snr_shift_scale": 1.0, "timestep_spacing": "leading", "steps_offset": 1,
                        "set_alpha_to_one": False, "clip_sample": True},
    # float32 betas (the scaled_linear ones are float64)
    "linear-snr-shift-2": {**COGVIDEOX_2B, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                           "rescale_betas_zero_snr": False, "snr_shift_scale": 2.0, "timestep_spacing": "leading",
                           "steps_offset": 1, "set_alpha_to_one": False},
    "sample-linspace": {**COGVIDEOX_2B, "prediction_type": "sample", "timestep_spacing": "linspace"},
}
WAN = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "num_train_timesteps": 1000,
       "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0, "solver_order": 2,
       "solver_type": "bh2", "predict_x0": True, "lower_order_final": True, "final_sigmas_type": "zero",
       "timestep_spacing": "linspace", "steps_offset": 0}
UNIPC = {
    "wan2.1-t2v-1.3b": WAN,
    "flow-shift-5": {**WAN, "flow_shift": 5.0},
    # bh1 only where the last step does not reach sigma 0 (diffusers' own ends in NaN there: see the refusal below)
    "bh1": {**WAN, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    "order-3-corrector-off-at-1": {**WAN, "solver_order": 3, "disable_corrector": [1]},
    "shift-terminal": {**WAN, "shift_terminal": 0.1},
    "epsilon": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"},
    "v-trailing": {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "solver_type": "bh1",
                   "final_sigmas_type": "sigma_min"},
    "sample-leading": {"prediction_type": "sample", "timestep_spacing": "leading", "steps_offset": 1},
}
FLOW_MATCH = {"default": {}, "shift-3": {"shift": 3.0}, "shift-3-terminal": {"shift": 3.0, "shift_terminal": 0.02}}
SHAPE = (1, 4, 3, 4, 4)


def cases(configs: dict[str, dict], step_counts: list[int]) -> list:
    """(config, steps) for each, but for a terminal shift of a single step (refused: diffusers' own is NaN)."""
    return [pytest.param(config, steps, id=f"{name}-{steps}") for name, config in configs.items()
            for steps in step_counts if steps > 1 or not config.get("shift_terminal")]


def check_step_for_step(reference, ours, steps: int, step_reference, step_ours=None) -> None:
    """Drive both from the same latents with the same random model outputs; they agree after every step."""
    reference.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert ours.timesteps.dtype == reference.timesteps.numpy().dtype
    assert ours.timesteps.tolist() == reference.timesteps.tolist()
    assert ours.init_noise_sigma == getattr(reference, "init_noise_sigma", 1.0)
    rng = np.random.default_rng(steps)
    latents = rng.standard_normal(SHAPE, dtype=np.float32)
    expected = torch.from_numpy(latents.copy())
    for i, t in enumerate(ours.timesteps):
        assert ours.scale_model_input(latents, t) is latents
        output = rng.standard_normal(SHAPE, dtype=np.float32)
        expected = step_reference(torch.from_numpy(output), i, expected)
        latents = (step_ours or ours.step)(output, t, latents)
        assert latents.dtype == np.float32
        np.testing.assert_allclose(latents, expected.numpy(), rtol=1e-5, atol=2e-5, err_msg=f"step {i}")


@pytest.mark.parametrize("steps", [1, 2, 7, 50])
@pytest.mark.parametrize("config", COGVIDEOX.values(), ids=COGVIDEOX.keys())
def test_the_numpy_cogvideox_ddim_steps_as_diffusers_cogvideox_ddim_scheduler(config, steps):
    reference = CogVideoXDDIMScheduler(**config)
    check_step_for_step(reference, numpy_sampler("CogVideoXDDIMScheduler", dict(reference.config)), steps,
                        lambda output, i, x: reference.step(output, reference.timesteps[i], x, eta=0.0).prev_sample)


@pytest.mark.parametrize("steps", [1, 2, 7, 50])
@pytest.mark.parametrize("config", COGVIDEOX.values(), ids=COGVIDEOX.keys())
def test_the_numpy_cogvideox_dpm_steps_as_diffusers_cogvideox_dpm_scheduler_in_cogvideox_pipeline(
        config, steps, monkeypatch):
    """CogVideoXPipeline's calls (the previous x0 and timestep, eta 0). The step is random even at eta 0, so the
    port is given the noise diffusers drew: the last of its draws in a step is the one it adds."""
    drawn, randn_tensor = [], cogvideox_dpm.randn_tensor

    def recorded(*args, **kwargs):
        drawn.append(randn_tensor(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(cogvideox_dpm, "randn_tensor", recorded)
    reference = CogVideoXDPMScheduler(**config)
    ours = numpy_sampler("CogVideoXDPMScheduler", dict(reference.config))
    generator = torch.Generator().manual_seed(steps)
    old_original = None

    def step_reference(output, i, x):
        nonlocal old_original
        timesteps = reference.timesteps
        x, old_original = reference.step(output, old_original, timesteps[i], timesteps[i - 1] if i > 0 else None, x,
                                         eta=0.0, generator=generator, return_dict=False)
        return x

    check_step_for_step(reference, ours, steps, step_reference,
                        lambda output, t, x: ours.step(output, t, x, noise=drawn[-1].numpy()))


def test_the_numpy_cogvideox_dpm_draws_from_its_rng_and_nothing_where_the_noise_scale_is_zero():
    reference = CogVideoXDPMScheduler(**COGVIDEOX_2B)
    rng = np.random.default_rng(0)
    ours = numpy_sampler("CogVideoXDPMScheduler", COGVIDEOX_2B, rng=rng)
    assert ours.random and not numpy_sampler("CogVideoXDDIMScheduler", COGVIDEOX_2B).random
    latents, output = np.random.default_rng(1).standard_normal((2, *SHAPE), dtype=np.float32)
    ours.set_timesteps(1)  # one step, from zero SNR to alpha 1: diffusers' noise is scaled by 0
    reference.set_timesteps(1)
    state = rng.bit_generator.state
    step = ours.step(output, ours.timesteps[0], latents)
    assert rng.bit_generator.state == state
    expected = reference.step(torch.from_numpy(output), None, reference.timesteps[0], None, torch.from_numpy(latents),
                              generator=torch.Generator().manual_seed(0))[0]
    np.testing.assert_allclose(step, expected.numpy(), rtol=1e-5, atol=2e-5)
    ours.set_timesteps(2)  # the first of two steps is random: drawn from rng
    ours.step(output, ours.timesteps[0], latents)
    assert rng.bit_generator.state != state


@pytest.mark.parametrize("config, steps", cases(UNIPC, [1, 2, 3, 10]))
def test_the_numpy_unipc_steps_as_diffusers_unipc_with_wan_config(config, steps):
    """WanPipeline's loop: set_timesteps, set_begin_index(0), step(noise_pred, t, latents)."""
    reference = UniPCMultistepScheduler(**config)
    ours = numpy_sampler("UniPCMultistepScheduler", dict(reference.config))

    def step_reference(output, i, x):
        if i == 0:
            reference.set_begin_index(0)
        return reference.step(output, reference.timesteps[i], x, return_dict=False)[0]

    check_step_for_step(reference, ours, steps, step_reference)


@pytest.mark.parametrize("config, steps", cases(FLOW_MATCH, [1, 2, 7, 28]))
def test_the_numpy_flow_match_euler_steps_as_diffusers_flow_match_euler_discrete_scheduler(config, steps):
    reference = FlowMatchEulerDiscreteScheduler(**config)
    check_step_for_step(reference, numpy_sampler("FlowMatchEulerDiscreteScheduler", dict(reference.config)), steps,
                        lambda output, i, x: reference.step(output, reference.timesteps[i], x).prev_sample)


def one_line_refusal(class_name: str, config: dict) -> str:
    with pytest.raises(Unsupported) as refused:
        numpy_sampler(class_name, config)
    message = str(refused.value)
    assert "\n" not in message and "not implemented by the engines-only sampler" in message
    return message


def test_a_scheduler_without_a_port_is_refused_in_one_line_naming_it():
    message = one_line_refusal("EulerAncestralDiscreteScheduler", {"num_train_timesteps": 1000})
    assert "EulerAncestralDiscreteScheduler" in message and "UniPCMultistepScheduler" in message


@pytest.mark.parametrize("class_name, config, key", [
    ("DDIMScheduler", {**COGVIDEOX_2B, "prediction_type": "v_prediction"}, "rescale_betas_zero_snr"),
    ("DDIMScheduler", {**COGVIDEOX_2B, "rescale_betas_zero_snr": False, "prediction_type": "flow_prediction"},
     "prediction_type"),
    ("CogVideoXDDIMScheduler", {**COGVIDEOX_2B, "beta_schedule": "sigmoid"}, "beta_schedule"),
    ("CogVideoXDPMScheduler", {**COGVIDEOX_2B, "prediction_type": "flow_prediction"}, "prediction_type"),
    ("UniPCMultistepScheduler", {**WAN, "use_karras_sigmas": True}, "use_karras_sigmas"),
    ("UniPCMultistepScheduler", {**WAN, "predict_x0": False}, "predict_x0"),
    ("UniPCMultistepScheduler", {**WAN, "use_flow_sigmas": False}, "prediction_type"),
    ("UniPCMultistepScheduler", {**WAN, "thresholding": True}, "thresholding"),
    ("UniPCMultistepScheduler", {**WAN, "use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ("FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True}, "use_karras_sigmas"),
    ("FlowMatchEulerDiscreteScheduler", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ("FlowMatchEulerDiscreteScheduler", {"use_beta_sigmas": True}, "use_beta_sigmas"),
    ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, "stochastic_sampling"),
])
def test_a_config_value_without_a_port_is_refused_in_one_line_naming_the_class_and_key(class_name, config, key):
    message = one_line_refusal(class_name, config)
    assert message.startswith(f"scheduler {class_name} {key} = ")


@pytest.mark.parametrize("change", [{"solver_type": "bh1"}, {"lower_order_final": False}])
def test_unipc_refuses_a_last_step_to_sigma_zero_where_diffusers_own_ends_in_nan_or_inf(change):
    config = {**WAN, **change}
    reference = UniPCMultistepScheduler(**config)
    reference.set_timesteps(3)
    latents = torch.ones(SHAPE)
    for t in reference.timesteps:
        latents = reference.step(torch.full(SHAPE, 0.5), t, latents).prev_sample
    assert not torch.isfinite(latents).all()
    assert "final_sigmas_type = 'zero'" in one_line_refusal("UniPCMultistepScheduler", config)


@pytest.mark.parametrize("class_name, config", [("UniPCMultistepScheduler", UNIPC["shift-terminal"]),
                                                ("FlowMatchEulerDiscreteScheduler", FLOW_MATCH["shift-3-terminal"])])
def test_a_terminal_shift_of_a_single_step_is_refused_in_one_line(class_name, config):
    sampler = numpy_sampler(class_name, config)
    with pytest.raises(Unsupported, match=f"^scheduler {class_name} shift_terminal = .* for a single step") as refused:
        sampler.set_timesteps(1)
    assert "\n" not in str(refused.value)


def test_importing_the_samplers_imports_neither_torch_nor_diffusers():
    done = subprocess.run([sys.executable, "-c", "import sys, f3export.scheduling\n"
                           "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers'}))"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
