"""The few-step schedulers by name (``--scheduler lcm`` / ``tcd``): every method that takes any scheduler runs
them, from its base's scheduler config; the methods with their own DDIM loops refuse them in one line."""

import numpy as np
import pytest

from brushnet.errors import RequestError
from brushnet.methods import get_method_class, inpaint, prepare
from brushnet.schedulers import SCHEDULERS, make_scheduler, pipeline_arguments

FEW = {"steps": 3, "guidance_scale": 1.0, "seed": 5, "prompt": "a cat"}
PIPELINE_METHODS = ["brushnet", "sd-inpainting", "controlnet-inpaint", "powerpaint"]
SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
}


@pytest.mark.parametrize("scheduler", ["lcm", "tcd"])
@pytest.mark.parametrize("name", [*PIPELINE_METHODS, "blended-latent-diffusion"])
def test_methods_run_the_few_step_schedulers(load, scene, name, scheduler):
    """Each method runs `steps` UNet calls with the scheduler named (no guidance: one call per step); the output
    is another image than DDIM's from the same seed."""
    method = load(name)
    image, mask = scene
    seen = []
    result = inpaint(
        method, image, mask, {**FEW, "scheduler": scheduler}, on_step=lambda i, n: seen.append(n)
    )
    if name in PIPELINE_METHODS:
        expected = {"lcm": "LCMScheduler", "tcd": "TCDScheduler"}[scheduler]
        assert type(method.pipeline.scheduler).__name__ == expected
    ddim = inpaint(method, image, mask, {**FEW, "scheduler": "ddim"})
    assert result.parameters["scheduler"] == scheduler
    assert result.unet_calls == FEW["steps"] and seen[-1] == FEW["steps"]
    out = np.asarray(result.images[0], dtype=float)
    assert np.isfinite(out).all()
    assert np.abs(out - np.asarray(ddim.images[0], dtype=float)).max() > 1


@pytest.mark.parametrize("scheduler", ["lcm", "tcd"])
@pytest.mark.parametrize(
    "name",
    # blended-latent-diffusion called scheduler.step without the generators: its stochastic steps drew from
    # torch's global generator
    [*PIPELINE_METHODS, "blended-latent-diffusion"],
)
def test_the_seed_gives_the_same_image(load, scene, name, scheduler):
    """LCM and TCD add noise at every step: it comes from the request's generators, so a seed repeats."""
    method = load(name)
    first, second = (inpaint(method, *scene, {**FEW, "scheduler": scheduler}) for _ in range(2))
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))


@pytest.mark.parametrize("name", ["repaint", "hd-painter"])
@pytest.mark.parametrize("scheduler", ["lcm", "tcd"])
def test_methods_with_their_own_ddim_loop_refuse_them(scene, name, scheduler):
    with pytest.raises(RequestError, match=f"method '{name}' does not use scheduler '{scheduler}'.*ddim"):
        prepare(get_method_class(name), *scene, {**FEW, "scheduler": scheduler})


def test_tcd_gets_its_own_gamma_through_a_pipeline(load, scene, monkeypatch):
    """diffusers' pipelines pass their ``eta`` (0) to TCD's step as its gamma; the methods pass TCD's 0.3, what its
    step takes when called without one (as Blended Latent Diffusion's own loop calls it)."""
    from diffusers import TCDScheduler

    gammas = []
    step = TCDScheduler.step

    def spy(self, *args, **kwargs):
        gammas.append(kwargs.get("eta", 0.3))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(TCDScheduler, "step", spy)
    inpaint(load("brushnet"), *scene, {**FEW, "scheduler": "tcd"})
    assert gammas == [0.3] * FEW["steps"]
    assert pipeline_arguments("tcd") == {"eta": 0.3} and pipeline_arguments("lcm") == {}


def test_the_grid_is_kept_and_widened_only_past_it():
    """LCM-LoRAs are distilled on a grid of 50 timesteps (k = 20): up to 50 steps the grid is diffusers' own; more
    steps widen it where diffusers would fail in set_timesteps."""
    from diffusers import LCMScheduler

    assert {"lcm", "tcd"} <= set(SCHEDULERS)
    reference = LCMScheduler.from_config(SD_CONFIG)
    reference.set_timesteps(4)
    for name in ("lcm", "tcd"):
        scheduler = make_scheduler(name, SD_CONFIG, steps=4)
        assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr
        scheduler.set_timesteps(4)
        assert scheduler.timesteps.tolist() == reference.timesteps.tolist() == [999, 759, 499, 259]
        with pytest.raises(ValueError, match="50"):  # diffusers' own refusal, without the steps
            make_scheduler(name, SD_CONFIG).set_timesteps(60)
        wide = make_scheduler(name, SD_CONFIG, steps=60)
        wide.set_timesteps(60)
        assert len(set(wide.timesteps.tolist())) == 60 and wide.timesteps.max() < 1000


@pytest.mark.parametrize("name", ["brushnet", "blended-latent-diffusion"])
def test_more_than_50_steps_run_in_the_methods(load, scene, name):
    """Blended Latent Diffusion built its scheduler without the step count, so lcm past 50 steps failed in
    diffusers (original_steps x strength < num_inference_steps) although make_scheduler widens the grid."""
    result = inpaint(load(name), *scene, {**FEW, "scheduler": "lcm", "steps": 60})
    assert result.unet_calls == 60
