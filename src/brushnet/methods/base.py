"""What every inpainting method declares and exchanges. Light: pydantic and the standard library only, so the
CLI can build its flags from the declarations without importing torch.

A method is one class (see :class:`InpaintMethod`) that declares its ``name``, its ``Options`` model, the
model folders it loads (:class:`ModelSlot`), the base-model families it runs on and the schedulers it takes;
it implements ``load`` (its models, once) and ``generate`` (its own denoising on a prepared region, a
:class:`Task`). Everything around it — request validation, mask handling, crop-to-mask, working size,
seeds, paste-back — is shared (:mod:`brushnet.methods.api`), so comparisons between methods are fair.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import InputError, RequestError
from ..schedulers import SCHEDULERS

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
    from PIL import Image

__all__ = [
    "FAMILIES",
    "FAMILY_GUIDANCE",
    "InpaintRequest",
    "ModelSlot",
    "ModelPaths",
    "LoraSpec",
    "BASE",
    "BASE_CONFIG",
    "NoOptions",
    "GuidanceWindow",
    "Task",
    "GenerateOutput",
    "PreparedJob",
    "InpaintResult",
    "InpaintMethod",
    "StepCallback",
    "validation_message",
    "given",
]

StepCallback = Callable[[int, int], None]  # (step done, total steps)

FAMILIES = ("sd15", "sdxl")
"""Base-model families: Stable Diffusion 1.x/2.x layout (``sd15``) and SDXL (``sdxl``)."""

FAMILY_GUIDANCE = {"sd15": 7.5, "sdxl": 5.0}
"""The guidance scale of a request that gives none, by base family: the original BrushNet examples' values,
which are also diffusers' pipeline defaults (SDXL is over-saturated at SD1.5's 7.5)."""


def validation_message(exc: ValidationError, what: str = "request") -> str:
    """One line for a pydantic error: ``bad <what>: <field>: <message>``."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or what
    if first["type"] == "extra_forbidden":
        return f"bad {what}: unknown field {where!r}"
    return f"bad {what}: {where}: {_plain(first['msg'])}"


def _plain(message: str) -> str:
    """A pydantic message without the "Value error, " its validators' own messages get."""
    return message.removeprefix("Value error, ")


def given(model: BaseModel, name: str) -> bool:
    """Whether field ``name`` of ``model`` was given (pydantic's ``model_fields_set``) a value other than its
    default. A value equal to the default does not count: the CLI, the benchmark and the demo pass every request
    field, and a recorded set of options (a result's ``parameters["options"]``) holds every option."""
    if name not in model.model_fields_set:
        return False
    return getattr(model, name) != type(model).model_fields[name].get_default(call_default_factory=True)


def _invalid_unicode(text: str) -> str | None:
    """What makes ``text`` invalid Unicode, or None: a lone UTF-16 surrogate (a JSON ``"\\ud800"`` escape without
    its pair, Python's ``"\\ud800"``, an undecodable byte of a command line) is a ``str`` no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}"
    return None


class InpaintRequest(BaseModel):
    """What to inpaint and how; shared by the Python API, CLI, REST API, web page and benchmarks.

    Unknown fields are an error. Method-specific settings go in ``options`` and are validated by the
    method's own ``Options`` model. Every field is a flag of the CLI commands that take a request
    (``--<field-with-dashes>``, or the names in ``json_schema_extra["cli"]``).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(
        "", description="What to paint in the hole.", json_schema_extra={"cli": ["--prompt", "-p"]}
    )
    negative_prompt: str = Field(
        "", description="What to avoid.", json_schema_extra={"cli": ["--negative-prompt", "-n"]}
    )
    seed: int | None = Field(None, ge=0, lt=2**63, description="Random seed; None draws one (reported).")
    steps: int = Field(50, ge=1, le=1000, description="Denoising steps.")
    guidance_scale: float | None = Field(
        None,
        ge=0.0,
        le=50.0,
        description="Classifier-free guidance (off at <= 1); unset: the base family's usual value, 7.5 for SD1.5 "
        "and 5.0 for SDXL.",
        json_schema_extra={"cli": ["--guidance", "--guidance-scale"]},
    )
    scheduler: str | None = Field(
        None,
        description=f"Scheduler: {', '.join(SCHEDULERS)}; None: the method's default (UniPC; RePaint: DDIM).",
    )
    num_images: int = Field(1, ge=1, le=16, description="Images per request; image i uses seed + i.")
    blend: bool = Field(True, description="Feathered paste-back: pixels away from the hole stay exact.")
    blend_kernel_size: int = Field(
        21, ge=1, le=255, description="Feathering Gaussian kernel, odd (paper: 21)."
    )
    mask_grow: int = Field(0, ge=-256, le=256, description="Grow (>0) or shrink (<0) the mask, pixels.")
    invert_mask: bool = Field(False, description="Treat black as the region to inpaint.")
    crop_to_mask: bool = Field(
        False, description="Work on a padded box around the mask at the model's native resolution."
    )
    crop_padding: int = Field(32, ge=0, le=4096, description="Padding of the crop box, pixels.")
    resolution: int | None = Field(
        None,
        ge=64,
        le=4096,
        description="Working size (area ~ resolution^2); default: the input's size, or the model's native "
        "resolution with crop_to_mask.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Method-specific options (see `brushnet methods`).",
        json_schema_extra={"cli": ["--option"]},
    )

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _valid_text(cls, value: str) -> str:
        problem = _invalid_unicode(value)
        if problem is not None:
            raise ValueError(f"not valid Unicode text: {problem}")
        return value

    @field_validator("options")
    @classmethod
    def _valid_option_text(cls, value: dict[str, Any]) -> dict[str, Any]:
        # a method's own text options (HD-Painter's prompts) reach a tokenizer too; a bad key would reach a message
        stack: list[tuple[Any, str]] = [(value, "")]
        while stack:
            item, where = stack.pop()
            if isinstance(item, str):
                problem = _invalid_unicode(item)
                if problem is not None:
                    raise ValueError(f"option {where} is not valid Unicode text: {problem}")
            elif isinstance(item, dict):
                for key, inner in item.items():
                    if _invalid_unicode(str(key)) is not None:
                        raise ValueError(f"option name {str(key)!r} is not valid Unicode text")
                    stack.append((inner, f"{where}.{key}" if where else str(key)))
            elif isinstance(item, list | tuple):
                stack.extend((inner, f"{where}[{i}]") for i, inner in enumerate(item))
        return value

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str | None) -> str | None:
        from ..schedulers import missing_package

        if value is None:
            return None
        if value.lower() not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {value!r}; choose one of: {', '.join(SCHEDULERS)}")
        package = missing_package(value)
        if package is not None:  # diffusers would fail at the first step, after loading
            raise ValueError(f"scheduler {value!r} needs the {package} package: pip install {package}")
        return value.lower()

    @field_validator("blend_kernel_size")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"blend_kernel_size must be odd, got {value}")
        return value

    def refuse_unused(self) -> None:
        """Refuse a field given a value that has no effect under the other settings (one line naming both).

        A field counts as given when set to a value other than its default (:func:`given`). (The benchmark and
        the demo generate with ``blend`` off and paste back with their own kernel: they keep it out of the
        request.)

        Raises:
            RequestError: ``negative_prompt`` with ``guidance_scale`` <= 1, ``crop_padding`` without
                ``crop_to_mask``, ``blend_kernel_size`` without ``blend``.
        """
        if given(self, "negative_prompt") and self.guidance_scale is not None and self.guidance_scale <= 1:
            raise RequestError(
                f"negative_prompt has no effect with guidance_scale {self.guidance_scale:g} (classifier-free "
                "guidance is off at <= 1): raise guidance_scale above 1 or leave negative_prompt empty"
            )
        if given(self, "blend_kernel_size") and not self.blend:
            raise RequestError(
                f"blend_kernel_size {self.blend_kernel_size} has no effect without blend (the output is not pasted "
                "back): turn blend on or leave blend_kernel_size unset"
            )
        if given(self, "crop_padding") and not self.crop_to_mask:
            raise RequestError(
                "crop_padding has no effect without crop_to_mask: turn crop_to_mask on or leave crop_padding unset"
            )

    def for_family(self, family: str) -> InpaintRequest:
        """This request with what the base family decides filled in: a ``guidance_scale`` of None becomes the
        family's usual value (:data:`FAMILY_GUIDANCE`)."""
        if self.guidance_scale is not None:
            return self
        return self.model_copy(update={"guidance_scale": FAMILY_GUIDANCE[family]})

    @classmethod
    def build(cls, request: InpaintRequest | dict | None = None, **overrides: Any) -> InpaintRequest:
        """A validated request from a request, a dict of its fields, or nothing, with ``overrides`` merged in.

        Raises:
            RequestError: one line naming the first bad field.
        """
        if isinstance(request, InpaintRequest):
            if not overrides:
                return request
            request = request.model_dump()
        elif request is not None and not isinstance(request, Mapping):
            raise RequestError(
                f"request must be an InpaintRequest or a dict of its fields, got {type(request).__name__}"
            )
        data = {**(request or {}), **overrides}
        try:
            return cls(**data)
        except ValidationError as exc:
            raise RequestError(validation_message(exc)) from None


@dataclass(frozen=True)
class ModelSlot:
    """A model folder a method loads: its key in :class:`ModelPaths`, its CLI flag, its help, the folder name
    it has in a model set (``brushnet make-tiny-models``, the demo models), the families it exists for, and
    how to build a random-weight one (``"module:function"`` called as ``function(out_dir, base_dir, preset,
    seed)``; ``None``: none can be built, so random-weight runs skip methods that need it)."""

    name: str
    help: str
    folder: str | None = None
    families: tuple[str, ...] = ("sd15",)
    random_builder: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


BASE = ModelSlot(
    "base",
    "Base model (SD1.5 or SDXL): diffusers folder, hub id or single .safetensors file.",
    folder="base",
    families=("sd15", "sdxl"),
    random_builder="brushnet.random_models:build_random_base",
)
BASE_CONFIG = ModelSlot(
    "base_config",
    "Config folder (or hub id) for a single-file base or inpainting model; needed offline.",
    families=("sd15", "sdxl"),
)


class LoraSpec(BaseModel):
    """A LoRA fused into the method's base UNet when it loads (:func:`~brushnet.methods.load_method` checks it):
    its file (``.safetensors``, or a folder holding one) and scale. Also given as ``"path"`` or ``(path, scale)``.
    ``sha256`` is what a result records; given, the file must have it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: str
    scale: float = 1.0
    sha256: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_path_or_pair(cls, value: Any) -> Any:
        import os

        if isinstance(value, (str, os.PathLike)):
            return {"path": os.fspath(value)}
        if isinstance(value, (tuple, list)):
            if len(value) != 2:
                raise ValueError(f"a LoRA is (path, scale), got {len(value)} items")
            path, scale = value
            return {"path": os.fspath(path) if isinstance(path, os.PathLike) else path, "scale": scale}
        return value


class ModelPaths(BaseModel):
    """Where a method's models are: one field per declared :class:`ModelSlot` (``base``, ``brushnet``, ...),
    plus the LoRAs fused into its base UNet (``loras``) and the loading policy ``allow_pickle``. A name no method
    declares is an error."""

    model_config = ConfigDict(extra="allow")

    allow_pickle: bool = Field(False, description="Allow pickle-based (.bin/.ckpt) weights (runs code).")
    loras: list[LoraSpec] = Field(
        default_factory=list, description="LoRAs fused into the base UNet, in order: (path, scale) each."
    )

    @model_validator(mode="after")
    def _known_slots(self):
        from .registry import model_slots

        known = model_slots()
        for name, value in (self.model_extra or {}).items():
            if name not in known:
                raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(known))}")
            if value is not None and not isinstance(value, str):
                setattr(self, name, str(value))
        return self

    def get(self, name: str) -> str | None:
        return (self.model_extra or {}).get(name)

    def __getattr__(self, name: str):  # a declared slot that was not given reads as None
        try:
            return super().__getattr__(name)
        except AttributeError:
            if not name.startswith("_"):
                from .registry import model_slots

                if name in model_slots():
                    return None
            raise

    def require(self, method: type[InpaintMethod]) -> None:
        """Raise a one-line :class:`~brushnet.errors.InputError` naming the flags ``method`` still needs."""
        missing = [slot.flag for slot in method.models if self.get(slot.name) is None]
        if missing:
            raise InputError(f"method {method.name!r} needs {', '.join(missing)}")

    def used_by(self, method: type[InpaintMethod]) -> dict[str, Any]:
        """The paths ``method`` reads (its required and optional slots that are set), the LoRAs (``loras``: path,
        scale, sha256) and the loading policy."""
        names = [slot.name for slot in (*method.models, *method.optional_models)]
        used = {name: self.get(name) for name in names if self.get(name) is not None}
        if self.loras:  # path, scale and the file's sha256, as results record them
            from .lora import lora_records

            used["loras"] = lora_records(self.loras)
        return {**used, "allow_pickle": self.allow_pickle}

    def unread(self, *methods: type[InpaintMethod]) -> list[str]:
        """The slots given a path that none of ``methods`` reads (neither a required nor an optional slot)."""
        read = {name for method in methods for name in self.used_by(method)}
        return [
            name for name, value in (self.model_extra or {}).items() if value is not None and name not in read
        ]

    def refuse_unused(self, method: type[InpaintMethod]) -> None:
        """Raise a one-line :class:`~brushnet.errors.InputError` naming the set paths ``method`` does not read
        (``--controlnet`` with ``brushnet``) and the flags it reads (optional ones in brackets), rather than
        dropping them. Callers that give one set of paths to several methods (``compare``, benchmarks) use
        :meth:`used_by` instead."""
        from .registry import model_slots

        unused = self.unread(method)
        if not unused:
            return
        given = ", ".join(model_slots()[name].flag for name in unused)
        reads = [slot.flag for slot in method.models] + [f"[{slot.flag}]" for slot in method.optional_models]
        verb, pronoun = ("is", "it") if len(unused) == 1 else ("are", "them")
        raise InputError(
            f"{given} {verb} not used by method {method.name!r} (it reads {', '.join(reads) or 'no model'}); "
            f"drop {pronoun} or choose another --method"
        )


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StrengthOption(BaseModel):
    """Denoising strength, for the methods whose pipelines start the hole from the noised input (as diffusers'
    inpaint pipelines' ``strength``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    strength: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Denoising strength: below 1 the hole starts from the input noised to this fraction of the "
        "schedule and only that fraction of the steps runs, keeping the hole's layout and colours.",
    )


class GuidanceWindow(BaseModel):
    """A branch's strength and the fraction of the steps during which it acts (ControlNet-style options)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    conditioning_scale: float = Field(1.0, ge=0.0, le=2.0, description="Residual scale (branch strength).")
    control_guidance_start: float = Field(0.0, ge=0.0, le=1.0, description="On from this step fraction.")
    control_guidance_end: float = Field(1.0, ge=0.0, le=1.0, description="Off after this step fraction.")

    @model_validator(mode="after")
    def _ordered(self):
        if self.control_guidance_start >= self.control_guidance_end:
            raise ValueError("control_guidance_start must be below control_guidance_end")
        return self


@dataclass
class Task:
    """One prepared region for a method's :meth:`InpaintMethod.generate`.

    Args:
        image: ``(1, 3, h, w)`` in [0, 1], ``h`` and ``w`` multiples of the method's ``size_multiple``.
        hole: ``(1, 1, h, w)`` in {0, 1}, **1 = region to generate** (the project's convention).
        request: the shared settings; ``request.scheduler`` is resolved (never None).
        options: the method's validated ``Options``.
        generators: one CPU generator per image (``request.num_images``), seeded ``seed + i``; pass the list
            to diffusers (``randn_tensor`` draws image i from generator i).
        on_step: called after each denoising step with ``(done, total)``.
        control_image: ``(1, 3, h, w)`` in [0, 1], the control image cropped and resized like ``image`` (for a
            method with a guide ControlNet, e.g. brushnet with ``--guide-controlnet``); else None.
    """

    image: torch.Tensor
    hole: torch.Tensor
    request: InpaintRequest
    options: BaseModel
    generators: list[torch.Generator]
    on_step: StepCallback | None = None
    control_image: torch.Tensor | None = None

    @property
    def num_images(self) -> int:
        return self.request.num_images

    def step(self, done: int, total: int) -> None:
        if self.on_step is not None:
            self.on_step(done, total)


@dataclass
class GenerateOutput:
    """What ``generate`` returns: images ``(N, 3, h, w)`` in [0, 1] at the working size, and how many network
    evaluations one image cost (per single sample; a CFG pair counts 2)."""

    images: torch.Tensor
    unet_calls: int
    extra_calls: dict[str, int] = field(default_factory=dict)


@dataclass
class PreparedJob:
    """A checked request, ready to run: everything that can be refused is refused before this exists.

    ``image`` is the RGB input at its own size (transparent pixels flattened onto black: what the model sees);
    ``hole`` the boolean mask (True = generate) after
    ``invert_mask`` and ``mask_grow``; ``seed`` the resolved seed (image i uses ``seed + i``); ``record``
    extra facts that go into the result's parameters (e.g. the outpainting extents); ``control_image`` the RGB
    control image of a guide ControlNet, at the image's size, or None; ``transparent`` the input as stored
    (RGBA: its colours and alpha) when it has a transparent pixel, else None: the result keeps that alpha and
    those colours wherever it keeps the input.
    """

    method: str
    request: InpaintRequest
    options: BaseModel
    image: Image.Image
    hole: np.ndarray
    seed: int
    record: dict[str, Any] = field(default_factory=dict)
    control_image: Image.Image | None = None
    transparent: Image.Image | None = None

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.request.num_images)]


@dataclass
class InpaintResult:
    """Images at the input's size, and everything needed to reproduce them."""

    images: list[Image.Image]
    method: str
    seed: int
    parameters: dict[str, Any]
    timings: dict[str, float]
    unet_calls: int
    extra_calls: dict[str, int] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "seed": self.seed,
            "parameters": self.parameters,
            "timings": self.timings,
            "unet_calls": self.unet_calls,
            "extra_calls": self.extra_calls,
        }


_UNET_INPUTS = {
    4: "a plain 4-channel SD base",
    9: "a 9-channel inpainting model (latent 4 + mask 1 + masked-image latent 4)",
}


class InpaintMethod(ABC):
    """Base class of every method.

    A subclass declares (class attributes):

    - ``name``, ``description``;
    - ``Options``: a pydantic model with ``extra="forbid"`` (its fields are ``--option key=value``);
    - ``models`` / ``optional_models``: the :class:`ModelSlot` s it needs / can use;
    - ``families``: the base families it runs on (:data:`FAMILIES`);
    - ``default_scheduler`` and ``schedulers`` (``None`` = any name of :data:`brushnet.schedulers.SCHEDULERS`);
    - ``native_resolution``: the working size of crop-to-mask before a model is loaded (a loaded method
      reads it from its model).

    and implements :meth:`load` and :meth:`generate`; :meth:`check` may refuse requests the method cannot
    honour. Mask conversion to the model's own convention happens inside ``generate``, once per method.
    Heavy imports (torch, diffusers) belong inside the methods, so declarations stay light.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    models: ClassVar[tuple[ModelSlot, ...]] = ()
    optional_models: ClassVar[tuple[ModelSlot, ...]] = ()
    families: ClassVar[tuple[str, ...]] = ("sd15",)
    default_scheduler: ClassVar[str] = "unipc"
    schedulers: ClassVar[tuple[str, ...] | None] = None
    native_resolution: int = 512
    #: working sizes are multiples of this (the VAE's downsampling factor)
    size_multiple: int = 8
    #: how the model sees the hole at latent size: "nearest" (one pixel of each cell, as the original
    #: pipelines and diffusers' inpaint pipelines do: a stroke thinner than a cell can fall out) or "cover"
    #: (any hole pixel makes its cell hole)
    latent_mask: ClassVar[str] = "nearest"
    #: where it was loaded from (set by :func:`~brushnet.methods.load_method`; recorded in results)
    model_paths: ModelPaths | None = None
    #: the family of the loaded base ("sd15", "sdxl")
    family: str = "sd15"
    #: whether a loaded method needs a control image (brushnet with a guide ControlNet)
    accepts_control_image: bool = False
    #: whether :meth:`compile` can speed the method up (False where its networks change on every call)
    compilable: ClassVar[bool] = True
    #: options :func:`~brushnet.methods.prepare_outpaint` sets where the request leaves them out (PowerPaint's
    #: ``task``: its outpainting prompts, not object insertion)
    outpaint_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, device: Any = "cpu", dtype: Any = None):
        import torch

        self.device = torch.device(device)
        self.dtype = dtype if dtype is not None else torch.float32

    @classmethod
    @abstractmethod
    def load(cls, models: ModelPaths, device: str = "cpu", dtype: Any = "fp32") -> InpaintMethod:
        """Load the method's models (``models.require(cls)`` first)."""

    @abstractmethod
    def generate(self, task: Task) -> GenerateOutput:
        """Inpaint a prepared region (see :class:`Task`)."""

    @classmethod
    def load_base(
        cls, models: ModelPaths, dtype: Any, slot: str = "base", in_channels: int | None = None
    ) -> dict[str, Any]:
        """The components of the model in ``slot`` (:func:`brushnet.loading.load_base_components`, with
        ``base_config`` and the pickle policy of ``models``), for a method's :meth:`load`.

        Args:
            models: the method's model paths.
            dtype: the weights' torch dtype.
            slot: the slot naming the model (``"base"``, ``"inpaint_model"``).
            in_channels: the UNet input width the method needs (4: a plain base; 9: an inpainting model); another
                width is a one-line :class:`~brushnet.errors.CheckpointError`.

        Returns:
            The components; for an SDXL base also ``force_zeros_for_empty_prompt`` as its ``model_index.json`` sets
            it (:func:`brushnet.loading.force_zeros_for_empty_prompt`), for the SDXL pipelines' constructors.
        """
        from ..errors import CheckpointError
        from ..loading import detect_family, force_zeros_for_empty_prompt, load_base_components

        path = models.get(slot)
        components = load_base_components(
            path, dtype=dtype, allow_pickle=models.allow_pickle, config=models.base_config
        )
        channels = components["unet"].config.in_channels
        if in_channels is not None and channels != in_channels:
            needs = _UNET_INPUTS.get(in_channels, f"a {in_channels}-channel UNet")
            raise CheckpointError(f"{path} has a {channels}-channel UNet; {cls.name} needs {needs}")
        if detect_family(components["unet"].config) == "sdxl":  # a base that encodes "" gets it encoded
            components["force_zeros_for_empty_prompt"] = force_zeros_for_empty_prompt(
                path, models.base_config
            )
        return components

    def compile(self, mode: str | None = None, backend: str = "inductor") -> list[str]:
        """Turn on ``torch.compile`` for the method's denoising network (what ``--compile`` does everywhere).

        A pipeline with its own fast path takes it: the BrushNet pipelines' ``compile()`` (branch, UNet with the
        residuals and guidance as one compiled step; CUDA graphs; docs/speed.md). Any other method's
        ``pipeline.unet`` (and ``controlnet``) is wrapped in ``torch.compile``, diffusers' own recipe. Compiled
        kernels are cached on disk (:func:`brushnet.pipelines.fast_path.compile_cache_dir`). A method whose
        networks change on every call (``compilable`` False) stays eager, with one warning.

        Args:
            mode: ``torch.compile`` mode; ``None``: ``"reduce-overhead"`` on CUDA, inductor's default elsewhere.
            backend: ``torch.compile`` backend.

        Returns:
            What was compiled (empty when nothing was).
        """
        import logging

        import torch

        from ..pipelines.fast_path import resolve_mode, use_compile_cache

        if not type(self).compilable:
            logging.getLogger(__name__).warning(
                "%s has no compiled path (its attention processors change on every call); it runs eagerly",
                self.name,
            )
            return []
        pipeline = getattr(self, "pipeline", None)
        if callable(getattr(pipeline, "compile", None)):
            pipeline.compile(mode=mode, backend=backend)
            return ["denoising step"]
        if backend == "inductor":
            use_compile_cache()
        compiled = []
        for name in ("unet", "controlnet"):
            module = getattr(pipeline, name, None)
            if isinstance(module, torch.nn.Module) and not hasattr(module, "_orig_mod"):
                setattr(
                    pipeline,
                    name,
                    torch.compile(module, mode=resolve_mode(mode, backend, self.device), backend=backend),
                )
                compiled.append(name)
        return compiled

    # ------------------------------------------------------------------ declarations, checks

    @classmethod
    def parse_options(cls, options: dict[str, Any]) -> BaseModel:
        try:
            return cls.Options(**options)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])  # empty for a check of several options together
            place = f"{where}: " if where else ""
            raise RequestError(f"bad option for method {cls.name!r}: {place}{_plain(first['msg'])}") from None

    @classmethod
    def check(cls, request: InpaintRequest, options: BaseModel) -> InpaintRequest:
        """Resolve what the method decides (the default scheduler) and refuse what it cannot do; return the
        request to run. Request fields given values that have no effect are refused here
        (:meth:`InpaintRequest.refuse_unused`); a subclass refuses its own such options. Subclasses extend it
        (calling ``super().check``)."""
        request.refuse_unused()
        strength = getattr(options, "strength", None)
        # diffusers' rule: int(steps x strength) steps run
        if strength is not None and int(request.steps * strength) < 1:
            raise RequestError(
                f"strength {strength:g} of {request.steps} steps runs no step (int(steps x strength) = 0): raise "
                "strength or steps (--steps)"
            )
        if request.scheduler is None:
            request = request.model_copy(update={"scheduler": cls.default_scheduler})
        if cls.schedulers is not None and request.scheduler not in cls.schedulers:
            raise RequestError(
                f"method {cls.name!r} does not use scheduler {request.scheduler!r} (it takes: "
                f"{', '.join(cls.schedulers)}); leave --scheduler unset for its default"
            )
        return request

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """The declaration as JSON-ready data (``brushnet methods``, ``GET /api/v1/methods``)."""
        try:
            defaults = cls.Options().model_dump()
        except ValidationError:  # an Options model with required fields has no defaults
            defaults = {}
        return {
            "name": cls.name,
            "description": cls.description,
            "families": list(cls.families),
            "models": [slot.name for slot in cls.models],
            "optional_models": [slot.name for slot in cls.optional_models],
            "default_scheduler": cls.default_scheduler,
            "schedulers": None if cls.schedulers is None else list(cls.schedulers),
            "native_resolution": cls.native_resolution,
            "options_schema": cls.Options.model_json_schema(),
            "options_defaults": defaults,
        }

    @classmethod
    def options_schema(cls) -> dict[str, Any]:
        return cls.Options.model_json_schema()
