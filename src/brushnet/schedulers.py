"""Schedulers by name, so the CLI, API and benchmarks can pick one with a word."""

from __future__ import annotations

from typing import Any

__all__ = ["SCHEDULERS", "make_scheduler"]

# name -> (diffusers class name, config overrides)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "unipc": ("UniPCMultistepScheduler", {}),
    # diffusers <= 0.27 UniPC (ends at sigma_min): what the original BrushNet and the paper's numbers used
    "unipc-original": ("UniPCMultistepScheduler", {"final_sigmas_type": "sigma_min"}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++sde": ("DPMSolverSDEScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
}


def make_scheduler(name: str, config: dict | Any):
    """Build the scheduler ``name`` from another scheduler's config (the base model's).

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    import diffusers

    key = name.lower()
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    class_name, overrides = SCHEDULERS[key]
    cls = getattr(diffusers, class_name)
    return cls.from_config(config, **overrides)
