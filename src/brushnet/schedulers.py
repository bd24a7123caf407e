"""Schedulers by name, so the CLI, API and benchmarks can pick one with a word; UniPC without per-step host
synchronisation on a GPU (:class:`brushnet.unipc.SyncFreeUniPCMultistepScheduler`, what the names ``unipc`` and
``unipc-original`` build); and the DDIM prediction conversion the methods with their own loops share
(:func:`original_and_noise`)."""

from __future__ import annotations

from typing import Any

__all__ = ["SCHEDULERS", "make_scheduler", "missing_package", "original_and_noise"]

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


def make_scheduler(name: str, config: dict | Any):
    """Build the scheduler ``name`` from another scheduler's config (the base model's).

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
