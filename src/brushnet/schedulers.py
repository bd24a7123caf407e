"""Schedulers by name, so the CLI, API and benchmarks can pick one with a word; UniPC without per-step host
synchronisation on a GPU (:class:`brushnet.unipc.SyncFreeUniPCMultistepScheduler`, what the names ``unipc`` and
``unipc-original`` build); the few-step samplers ``lcm`` and ``tcd`` (for LCM-, TCD- and Hyper-SD LoRAs: see
docs/composing.md); and the DDIM prediction conversion the methods with their own loops share
(:func:`original_and_noise`)."""

from __future__ import annotations

from typing import Any

__all__ = ["SCHEDULERS", "make_scheduler", "missing_package", "pipeline_arguments", "original_and_noise"]

# name -> (diffusers class name, config overrides)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "unipc": ("UniPCMultistepScheduler", {}),
    # diffusers <= 0.27 UniPC (ends at sigma_min): what the original BrushNet and the paper's numbers used
    "unipc-original": ("UniPCMultistepScheduler", {"final_sigmas_type": "sigma_min"}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    # PLMS, as Stable Diffusion's own PNDM configs set it; from a base whose scheduler is not PNDM (no such key)
    # diffusers' default is the Runge-Kutta warm-up, which needs 4 steps or more and evaluates the model 13 times
    # for 4 steps
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++sde": ("DPMSolverSDEScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    # few-step samplers (Luo et al. 2023; Zheng et al. 2024): made for an LCM-, TCD- or Hyper-SD LoRA (or UNet) at
    # 2-8 steps and guidance 1; they take their timesteps from a grid of original_inference_steps (50) of the
    # training timesteps, which make_scheduler widens to the steps asked for when there are more
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}

GRID_SCHEDULERS = ("lcm", "tcd")
"""Schedulers that take ``steps`` timesteps out of a grid of ``original_inference_steps`` (diffusers fails when
``steps`` is larger; :func:`make_scheduler` given the steps makes the grid that large instead)."""

PIPELINE_ARGUMENTS: dict[str, dict[str, Any]] = {
    # diffusers' pipelines pass their `eta` (0 by default, DDIM's) to every scheduler whose step takes one, and TCD
    # reads it as its gamma: 0 would make TCD deterministic, where its own default (what its step uses when called
    # without it, as the methods with their own loops do) and its paper's recommendation is 0.3
    "tcd": {"eta": 0.3},
}


PACKAGES: dict[str, str] = {"dpm++sde": "torchsde"}
"""Schedulers that need a package the project does not install (diffusers imports it on the first step)."""


def missing_package(name: str) -> str | None:
    """The package scheduler ``name`` needs that is not installed here, or None."""
    import importlib.util

    package = PACKAGES.get(name.lower())
    if package is not None and importlib.util.find_spec(package) is None:
        return package
    return None


def pipeline_arguments(name: str) -> dict[str, Any]:
    """The pipeline call arguments scheduler ``name`` needs besides the scheduler itself (TCD: its γ as ``eta``)."""
    return dict(PIPELINE_ARGUMENTS.get(name.lower(), {}))


def make_scheduler(name: str, config: dict | Any, steps: int | None = None):
    """Build the scheduler ``name`` from another scheduler's config (the base model's).

    Args:
        name: a key of :data:`SCHEDULERS` (any case).
        config: the config to build it from (prediction type, betas, zero terminal SNR, ... carry over).
        steps: the steps it will be asked for, if known: ``lcm`` and ``tcd`` take them from a grid of
            ``original_inference_steps`` (50) timesteps, which is widened to ``steps`` when that is larger (diffusers
            would fail at ``set_timesteps``); the grid of 50 is kept otherwise, the one LCM- and TCD-LoRAs are
            distilled on.

    Raises:
        ValueError: for an unknown name, listing the known ones, or one whose package is not installed.
    """
    import diffusers

    from .unipc import SyncFreeUniPCMultistepScheduler

    key = name.lower()
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    package = missing_package(key)
    if package is not None:
        raise ValueError(f"scheduler {name!r} needs the {package} package: pip install {package}")
    class_name, overrides = SCHEDULERS[key]
    cls = (
        SyncFreeUniPCMultistepScheduler
        if class_name == "UniPCMultistepScheduler"
        else getattr(diffusers, class_name)
    )
    if key in GRID_SCHEDULERS and steps is not None:
        grid = cls.from_config(config, **overrides).config.original_inference_steps
        if steps > grid:
            overrides = {**overrides, "original_inference_steps": steps}
    return cls.from_config(config, **overrides)


def original_and_noise(model_output, sample, alpha_bar: float, prediction_type: str):
    """``(x̂₀, ε̂)`` from a model's output at ``sample`` ``x_t`` with cumulative ``ᾱ_t`` (DDIM, Song et al. 2021,
    eq. 12; v-prediction, Salimans & Ho 2022): ``epsilon``: ``x̂₀ = (x_t − √(1−ᾱ)·ε)/√ᾱ``, ``ε̂ = ε``;
    ``v_prediction``: ``x̂₀ = √ᾱ·x_t − √(1−ᾱ)·v``, ``ε̂ = √ᾱ·v + √(1−ᾱ)·x_t``.

    Args:
        model_output: the (guided) prediction, ``ε`` or ``v``.
        sample: ``x_t``, same shape.
        alpha_bar: ``ᾱ_t`` as a float.
        prediction_type: ``"epsilon"`` or ``"v_prediction"`` (the caller checks it).
    """
    if prediction_type == "epsilon":
        return (sample - (1 - alpha_bar) ** 0.5 * model_output) / alpha_bar**0.5, model_output
    original = alpha_bar**0.5 * sample - (1 - alpha_bar) ** 0.5 * model_output
    return original, alpha_bar**0.5 * model_output + (1 - alpha_bar) ** 0.5 * sample
