"""The fast path of the BrushNet pipelines: the per-step prediction compiled once per input shape.

``pipe.compile()`` makes the denoising loop call :func:`~brushnet.pipelines.denoising_step.guided_noise` (branch,
optional ControlNet, the UNet with the branch's residuals, classifier-free guidance) through ``torch.compile`` as one
function. On CUDA the default mode is ``"reduce-overhead"``: inductor kernels replayed as one CUDA graph per step,
which removes the per-kernel launch cost that bounds a batch-1 step. What stays outside: the scheduler step, the VAE
and the text encoders (once per call).

- Static shapes: one graph per (batch, latent height, latent width, guidance on/off, branch dtype, ...); a new
  combination compiles once more (logged once), then replays. Nothing per step recompiles: the timestep, the
  branch's scale and the guidance scale reach the graph as tensors.
- Warm starts: inductor's on-disk caches (FX graph cache, AOTAutograd cache; Triton's kernels) go to
  :func:`compile_cache_dir`, so a second process, or the server after a restart, finds its kernels there and only
  re-traces (``BRUSHNET_COMPILE_CACHE`` moves it; deleting the folder clears it). An explicitly set
  ``TORCHINDUCTOR_CACHE_DIR`` wins.
- With CUDA graphs the step's output lives in graph memory that the next replay overwrites; it is copied out (one
  latent-sized copy) so schedulers that keep model outputs (PNDM, LMS) stay correct.

Offloading (model, sequential or group) moves weights inside the step, which a compiled graph cannot do: a
compiled pipeline with offload hooks is refused with one line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .denoising_step import StepPlan, guided_noise

logger = logging.getLogger(__name__)

__all__ = ["CompiledStep", "compile_cache_dir", "use_compile_cache", "resolve_mode", "CACHE_ENV"]

CACHE_ENV = "BRUSHNET_COMPILE_CACHE"
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# cache folders the user chose (inductor sets TORCHINDUCTOR_CACHE_DIR itself once it has run)
_USER_CACHE_DIRS = {name: os.environ.get(name) for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}


def compile_cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where compiled kernels are kept between processes.

    ``path`` if given, else ``$BRUSHNET_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/brushnet/torch-compile`` (default
    ``~/.cache/brushnet/torch-compile``). Deleting the folder clears the cache; the next compile rebuilds it.
    """
    if path is not None:
        return Path(path).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "brushnet" / "torch-compile"


def use_compile_cache(path: str | os.PathLike | None = None) -> Path:
    """Point inductor's and Triton's on-disk caches into :func:`compile_cache_dir` (``inductor/``, ``triton/``).

    Without ``path``, a ``TORCHINDUCTOR_CACHE_DIR`` / ``TRITON_CACHE_DIR`` the user set before this module was
    imported is kept. Returns the folder inductor's cache uses.
    """
    root = compile_cache_dir(path)
    if path is not None or _USER_CACHE_DIRS["TORCHINDUCTOR_CACHE_DIR"] is None:
        (root / "inductor").mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    if path is not None or _USER_CACHE_DIRS["TRITON_CACHE_DIR"] is None:
        os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def resolve_mode(mode: str | None, backend: Any, device: Any) -> str | None:
    """The ``torch.compile`` mode to use: ``mode`` if given; for inductor on CUDA ``"reduce-overhead"`` (CUDA graphs:
    a batch-1 step is bound by kernel launches); otherwise ``None`` (inductor's default; other backends take none)."""
    if mode is not None or backend != "inductor":
        return mode
    return "reduce-overhead" if torch.device(device).type == "cuda" else None


@dataclass
class CompiledStep:
    """The compiled per-step prediction of one pipeline (what ``pipe.compile()`` installs).

    Args:
        mode: ``torch.compile`` mode; ``None``: ``"reduce-overhead"`` (CUDA graphs) on CUDA, inductor's default
            elsewhere. Only for the inductor backend.
        backend: ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` / ``"eager"`` trace without generating
            kernels: for tests and for finding graph breaks).
        fullgraph: fail on a graph break instead of splitting the step.
        dynamic: ``False``: static shapes, one graph per input shape.
        options: inductor options (e.g. ``{"conv_1x1_as_mm": True}``); not together with ``mode``.
        cache_dir: see :func:`compile_cache_dir`.
    """

    mode: str | None = None
    backend: str | Callable = "inductor"
    fullgraph: bool = True
    dynamic: bool = False
    options: dict[str, Any] | None = None
    cache_dir: str | os.PathLike | None = None
    _function: Callable | None = field(default=None, init=False, repr=False)
    _cuda_graphs: bool = field(default=False, init=False, repr=False)
    resolved_mode: str | None = field(default=None, init=False)
    _seen: set = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode is not None and self.options is not None:
            raise ValueError("pass either `mode` or `options` to compile, not both (torch.compile's rule)")
        if self.mode is not None and self.backend != "inductor":
            raise ValueError(f"`mode` applies to the inductor backend only, got backend {self.backend!r}")

    @property
    def shapes_compiled(self) -> int:
        """How many (shape, settings) combinations the step has been compiled for in this process."""
        return len(self._seen)

    def check(self, pipe) -> None:
        """Refuse offload hooks (they move weights inside the step); called once per pipeline call."""
        for name in ("unet", "brushnet", "controlnet"):
            module = getattr(pipe, name, None)
            if module is None:
                continue
            module = getattr(module, "_orig_mod", module)
            hooked = getattr(module, "_hf_hook", None) is not None
            registry = getattr(module, "_diffusers_hook", None)
            hooked = hooked or bool(registry is not None and registry._hook_order)
            if hooked:
                raise ValueError(
                    f"pipe.compile() cannot run with offloading: the {name} carries offload hooks; use one or the "
                    "other (pipe.uncompile(), or reload without offloading)"
                )

    def _build(self, device: torch.device) -> None:
        mode = resolve_mode(self.mode, self.backend, device) if self.options is None else None
        if self.backend == "inductor":
            use_compile_cache(self.cache_dir)
        self._cuda_graphs = device.type == "cuda" and self.backend == "inductor" and mode in CUDA_GRAPH_MODES
        kwargs: dict[str, Any] = dict(backend=self.backend, fullgraph=self.fullgraph, dynamic=self.dynamic)
        if self.backend == "inductor":
            kwargs.update(mode=mode, options=self.options)
        self._function = torch.compile(guided_noise, **kwargs)
        self.resolved_mode = mode

    def __call__(
        self, brushnet, unet, controlnet, plan: StepPlan, latents: torch.Tensor, t, **kwargs
    ) -> torch.Tensor:
        """:func:`~brushnet.pipelines.denoising_step.guided_noise`, compiled; same arguments."""
        if self._function is None:
            self._build(latents.device)
        key = (tuple(latents.shape), plan, id(brushnet), id(unet), id(controlnet))
        if key not in self._seen:
            self._seen.add(key)
            batch, _, height, width = latents.shape
            logger.info(
                "compiling the denoising step for batch %d, %dx%d latents, guidance %s (%s; once per shape)",
                batch,
                height,
                width,
                "on" if plan.guidance else "off",
                f"{self.backend}, mode {self.resolved_mode}" if self.backend == "inductor" else self.backend,
            )
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        noise_pred = self._function(brushnet, unet, controlnet, plan, latents, t, **kwargs)
        # a CUDA graph's output is overwritten by its next replay: hand the scheduler its own copy
        return noise_pred.clone() if self._cuda_graphs else noise_pred
