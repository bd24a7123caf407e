"""Training configuration: one pydantic model, read from a YAML/JSON file and overridden by flags.

The flag vocabulary is that of diffusers' ``train_controlnet.py`` (``--pretrained_model_name_or_path``,
``--resolution``, ``--train_batch_size``, ...). Every field of :class:`TrainConfig` is a flag of the same
name, so the config file and the command line share one schema; unknown keys in the file are an error
(``extra="forbid"``), so a misspelling never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import json
import os
import types
import typing
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..data.masks import MaskConfig

__all__ = [
    "TrainConfig",
    "ConfigError",
    "load_config_file",
    "build_parser",
    "parse_train_args",
    "save_config",
    "vae_scale_factor",
    "check_resolution",
]


class ConfigError(ValueError):
    """A bad training configuration (unreadable file, unknown key, invalid value). The message is readable."""


class TrainConfig(BaseModel):
    """Everything a training run needs. Field names are the command-line flags (``--<name>``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # models
    pretrained_model_name_or_path: str = Field(
        description="Base model folder or hub id, SD1.5-style or SDXL (diffusers layout: unet/, vae/, text_encoder/, "
        "tokenizer/, scheduler/; SDXL also text_encoder_2/, tokenizer_2/)."
    )
    revision: str | None = Field(None, description="Revision of the base model on the hub.")
    pretrained_vae_model_name_or_path: str | None = Field(
        None,
        description="Another VAE folder or hub id for the base (e.g. an fp16-fixed SDXL VAE, which then trains and "
        "validates in fp16 under --mixed_precision fp16); default: the base's own vae/.",
    )
    brushnet_model_name_or_path: str | None = Field(
        None, description="Continue from this BrushNet checkpoint folder; default: initialise from the UNet."
    )
    output_dir: str = Field("brushnet-model", description="Where checkpoints, logs and the final model go.")
    allow_pickle: bool = Field(
        False,
        description="Allow pickle-based (.bin/.ckpt) weights for the base and --brushnet_model_name_or_path, and "
        "resuming under FSDP/DeepSpeed (their loaders use pickle); loading a pickle can run code: only for "
        "sources you trust.",
    )

    # data
    train_data_dir: str | None = Field(None, description="Folder dataset (images + masks/captions).")
    train_shards: str | None = Field(
        None,
        description="BrushData webdataset shards: a brace pattern (data/{00000..00009}.tar) or a folder of .tar.",
    )
    resolution: int = Field(512, gt=0, description="Training resolution (square crops).")
    mask: MaskConfig = Field(
        default_factory=MaskConfig,
        description="Training-mask recipe (brushnet.data.MaskConfig); flags --mask_<key> set its scalar keys.",
    )
    shuffle_buffer: int = Field(
        1000,
        ge=0,
        description="Samples in the per-worker shuffle buffer of a shard stream (0: no shuffling).",
    )
    caption_dropout: float = Field(
        0.0, ge=0, le=1, description="Probability of training on an empty caption."
    )
    caption_dropout_embeds: Literal["encoded", "zeros"] | None = Field(
        None,
        description="What a caption dropped by --caption_dropout becomes: 'encoded' (the text \"\" through the text "
        "encoders, as the original does) or 'zeros' (zero prompt embeds and zero pooled embeds, the unconditional "
        "half SDXL inference builds without a negative prompt); default: the base's own convention (SDXL: zeros "
        "unless the base's model_index.json sets force_zeros_for_empty_prompt false; SD1.5: encoded). It is also "
        "the default of --unconditional_embeds.",
    )
    unconditional_embeds: Literal["encoded", "zeros"] | None = Field(
        None,
        description="The unconditional half of guidance that the kept-invariance, guided and anchor terms run the "
        "UNet on: 'encoded' (\"\" through the text encoders) or 'zeros'; default: what a dropped caption becomes "
        "(--caption_dropout_embeds), so the branch learns one unconditional input; on a resume, what the run used.",
    )
    dataloader_num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")

    # optimisation
    train_batch_size: int = Field(2, gt=0, description="Batch size per device.")
    max_train_steps: int | None = Field(
        None, gt=0, description="Optimizer steps in total; overrides --num_train_epochs."
    )
    num_train_epochs: int = Field(
        1,
        gt=0,
        description="Passes over the data when --max_train_steps is unset: ceil(E × batches per epoch / "
        "accumulation) optimizer steps (a last window may finish with a few batches of the next epoch).",
    )
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant", description="Learning-rate schedule (diffusers.optimization.get_scheduler)."
    )
    lr_warmup_steps: int = Field(0, ge=0, description="Warm-up optimizer steps.")
    adam_beta1: float = Field(0.9, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, description="AdamW beta2.")
    adam_weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass.")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = Field(
        None, description="Mixed precision of the frozen parts; default: the accelerate config's."
    )
    allow_tf32: bool = Field(False, description="Allow TF32 matmuls on Ampere+ GPUs.")
    use_ema: bool = Field(False, description="Keep an exponential moving average of the branch.")
    ema_decay: float = Field(0.9999, gt=0, lt=1, description="EMA decay.")
    kept_invariance_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of a term that makes the kept region's prediction independent of the caption (the mean "
        "squared difference, over latent cells no hole pixel touches, between the predictions with the caption and "
        "with the empty caption, which classifier-free guidance multiplies); 0: the paper's loss. One more UNet pass "
        "per step.",
    )
    kept_invariance_margin: int = Field(
        0,
        ge=0,
        description="With kept_invariance_weight: leave this many rings of latent cells around the cells a hole pixel "
        "touches out of the term (those cells stay free to follow the caption); 0: every kept cell counts.",
    )
    kept_invariance_min_timestep: int = Field(
        0,
        ge=0,
        description="With kept_invariance_weight: only the samples noised to this training timestep or above count "
        "in the term (the caption's pull on the kept region is largest at high noise, and the object's shape is "
        "decided lower); 0: every sample.",
    )
    guided_loss_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of a term that trains the branch for guided sampling: the squared error, over the whole "
        "latent, of the classifier-free-guided prediction (the predictions with the caption and with the empty "
        "caption, both with the branch, combined at guided_loss_scale) against the target; 0: the paper's loss. One "
        "more UNet pass per step (shared with kept_invariance_weight). An experiment: on the demo world it taught the "
        "branch to undo the guidance (docs/training.md).",
    )
    guided_loss_scale: float = Field(
        5.0, ge=1, description="With guided_loss_weight: the guidance scale of that guided prediction."
    )
    hole_pull_anchor_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of a term that holds the caption's pull in the hole (the difference between the "
        "predictions with the caption and with the empty caption, over the latent cells a hole pixel touches) to "
        "that of the starting branch, kept frozen: the mean squared difference of the two pulls; 0: off. Meant "
        "beside kept_invariance_weight, which otherwise turns the pull down in the hole too. One more branch pass "
        "and UNet pass per step, without gradients. On the demo world it kept the shape but slowed the kept region's "
        "gain; over 1200 steps (64, 4) came within 1 dB of BLD for a small shape loss, and that branch ships in the "
        "demo (docs/demo.md); untried on real SD models.",
    )
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="Training target; default: the base scheduler config's."
    )
    seed: int | None = Field(
        None, description="Random seed; chosen and recorded in train_config.yaml if unset."
    )

    # checkpoints
    checkpointing_steps: int = Field(
        500, gt=0, description="Save checkpoint-<step>/ every N optimizer steps."
    )
    checkpoints_total_limit: int | None = Field(None, gt=0, description="Keep only the newest N checkpoints.")
    resume_from_checkpoint: str | None = Field(None, description="'latest' or a checkpoint-<step> folder.")

    # validation and logging
    validation_steps: int = Field(500, gt=0, description="Run validation every N optimizer steps.")
    validation_prompts: list[str] | None = Field(None, description="Prompts for the validation images.")
    validation_images: list[str] | None = Field(None, description="Validation image files.")
    validation_masks: list[str] | None = Field(None, description="Validation mask files (white = inpaint).")
    num_validation_samples: int = Field(
        4, gt=0, description="Samples taken from the first batch when no validation images are given."
    )
    validation_inference_steps: int = Field(20, gt=0, description="Denoising steps for validation images.")
    validation_guidance_scale: float | None = Field(
        None,
        ge=0,
        description="Guidance scale for validation images; default: the base family's usual value (7.5 for SD1.5, "
        "5.0 for SDXL, as inference uses).",
    )
    validation_loss_steps: int | None = Field(
        None,
        gt=0,
        description="Evaluate the held-out validation loss every N optimizer steps (and at step 0 and at the end): "
        "the training loss of a fixed set of samples never trained on, at fixed masks, noise and timesteps, written "
        "to validation_loss.json and the tracker; default: off.",
    )
    validation_shards: str | None = Field(
        None,
        description="Held-out BrushData shards for the validation loss (as --train_shards); default: "
        "--validation_loss_samples samples held out of the training data.",
    )
    validation_data_dir: str | None = Field(
        None,
        description="Held-out image folder for the validation loss (as --train_data_dir); default: "
        "--validation_loss_samples samples held out of the training data.",
    )
    validation_loss_samples: int = Field(
        8,
        gt=0,
        description="Samples of the validation loss: the first N of --validation_shards / --validation_data_dir, "
        "else N held out of the training data (never trained on).",
    )
    validation_loss_buckets: int = Field(
        5,
        gt=0,
        description="Timestep ranges of the validation loss: each sample is evaluated once in each of N equal "
        "ranges of the training schedule, and each range's mean is logged beside the overall mean.",
    )
    report_to: Literal["tensorboard", "none"] = Field("tensorboard", description="Experiment tracker.")
    logging_dir: str = Field("logs", description="Tracker folder, relative to --output_dir.")
    logging_steps: int = Field(1, gt=0, description="Log loss and learning rate every N optimizer steps.")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if (self.train_data_dir is None) == (self.train_shards is None):
            raise ValueError("give exactly one of train_data_dir and train_shards")
        given = {
            name: len(value)
            for name in ("validation_prompts", "validation_images", "validation_masks")
            if (value := getattr(self, name)) is not None
        }
        if given and (len(given) != 3 or len(set(given.values())) != 1):
            raise ValueError(
                "validation_prompts, validation_images and validation_masks go together, with one entry each "
                f"per sample (got {given})"
            )
        if self.validation_shards is not None and self.validation_data_dir is not None:
            raise ValueError("give at most one of validation_shards and validation_data_dir")
        for name in ("validation_shards", "validation_data_dir"):
            if getattr(self, name) is not None and self.validation_loss_steps is None:
                raise ValueError(
                    f"{name} is the held-out set of the validation loss: give validation_loss_steps too"
                )
        return self


# -- files ---------------------------------------------------------------------------------------------


def load_config_file(path: str | os.PathLike) -> dict:
    """Read a ``.yaml``/``.yml``/``.json`` config file into a dict (not validated yet)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from error
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot parse config file {path}: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values")
    return data


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write ``config`` as YAML, atomically (:func:`brushnet.io.atomic_write_text`)."""
    from ..io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def make_config(values: dict) -> TrainConfig:
    """Validate ``values`` into a :class:`TrainConfig`, turning pydantic's error into a readable one."""
    try:
        return TrainConfig(**values)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: "
            + ("unknown option (misspelled?)" if e["type"] == "extra_forbidden" else e["msg"])
            for e in error.errors()
        )
        raise ConfigError(f"invalid training config: {problems}") from None


# -- flags ---------------------------------------------------------------------------------------------


def _flag_kwargs(annotation) -> dict:
    """argparse keyword arguments for a field annotation (``int | None`` → ``type=int``, ...)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) == 1:
            return _flag_kwargs(inner[0])
    if origin is Literal:
        return {"choices": list(typing.get_args(annotation))}
    if origin is list:
        (item,) = typing.get_args(annotation)
        return {"nargs": "+", "type": item}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": annotation}


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors (an unknown flag, a bad choice, a missing value) raise
    :class:`ConfigError` with argparse's one-line message, instead of printing the whole usage text and
    exiting; ``--help`` still prints every flag."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        raise ConfigError(message)


def _unknown_flags(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """The message for arguments no flag takes: the unknown flags, each with the closest real flag if any."""
    import difflib

    known = [flag for action in parser._actions for flag in action.option_strings]
    flags = [arg.split("=", 1)[0] for arg in extras if arg.startswith("-")]
    if not flags:
        return f"unexpected argument {extras[0]!r}: every option is a --flag (--help lists the flags)"
    parts = []
    for flag in flags:
        close = difflib.get_close_matches(flag, known, n=1)
        parts.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
    noun = "flag" if len(flags) == 1 else "flags"
    return f"unknown {noun} {', '.join(parts)} (--help lists the flags)"


def build_parser(prog: str = "brushnet train") -> argparse.ArgumentParser:
    """An argparse parser with ``--config`` and one flag per :class:`TrainConfig` field.

    Defaults are suppressed, so the parsed namespace holds only the flags actually given; they override
    the config file, which overrides the field defaults. A usage error raises :class:`ConfigError`.
    """
    parser = _Parser(
        prog=prog,
        description="Train a BrushNet branch on a frozen Stable Diffusion base.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML or JSON file of options; flags given here override it.")
    for prefix, model in (("", TrainConfig), (_MASK_PREFIX, MaskConfig)):
        hints = typing.get_type_hints(model)
        for name, field in model.model_fields.items():
            if isinstance(hints[name], type) and issubclass(hints[name], BaseModel):
                continue  # nested models are set in the config file
            default = "required" if field.is_required() else f"default: {field.default}"
            parser.add_argument(
                f"--{prefix}{name}", help=f"{field.description} ({default})", **_flag_kwargs(hints[name])
            )
    return parser


_MASK_PREFIX = "mask_"


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse flags (and ``--config``) into a validated :class:`TrainConfig`.

    Raises:
        ConfigError: unreadable config file, unknown key or flag, invalid value (a bad choice names the choices).
        SystemExit: from argparse, for ``--help`` (only at the command-line edge).
    """
    parser = build_parser()
    namespace, extras = parser.parse_known_args(argv)
    if extras:
        raise ConfigError(_unknown_flags(parser, extras))
    flags = vars(namespace)
    config_path = flags.pop("config", None)
    values = load_config_file(config_path) if config_path else {}
    mask_flags = {k[len(_MASK_PREFIX) :]: flags.pop(k) for k in list(flags) if k.startswith(_MASK_PREFIX)}
    values.update(flags)
    if mask_flags:
        mask = values.get("mask") or {}
        if not isinstance(mask, dict):
            raise ConfigError("config key 'mask' must be a mapping of MaskConfig keys")
        values["mask"] = {**mask, **mask_flags}
    return make_config(values)


# -- checks against the model ----------------------------------------------------------------------------

DEFAULT_VAE_SCALE_FACTOR = 8
"""The VAE downsampling of every Stable Diffusion base (SD1.5, SD2, SDXL): the factor assumed when the base's
``vae/config.json`` cannot be read here (a hub id, a single file)."""


def vae_scale_factor(pretrained_model_name_or_path: str | os.PathLike) -> int:
    """How much the base's VAE downsamples (``2 ** (levels - 1)``), read from ``vae/config.json`` of a local
    diffusers folder (or ``config.json`` of a VAE folder) without loading anything; :data:`DEFAULT_VAE_SCALE_FACTOR`
    when neither can be read."""
    folder = Path(pretrained_model_name_or_path).expanduser()
    blocks = None
    for path in (folder / "vae" / "config.json", folder / "config.json"):
        try:
            blocks = json.loads(path.read_text()).get("block_out_channels")
            break
        except (OSError, ValueError, AttributeError):
            continue
    if isinstance(blocks, list) and blocks:
        return 2 ** (len(blocks) - 1)
    return DEFAULT_VAE_SCALE_FACTOR


def check_resolution(config: TrainConfig) -> None:
    """Refuse a ``resolution`` the base's VAE cannot encode to a whole latent: it must be a multiple of the VAE's
    downsampling (8 for Stable Diffusion; any latent size then works with the UNet, 1 included). Reads only the
    VAE config, before any model loads.

    Raises:
        ConfigError: one line with the smallest valid value and the nearest ones.
    """
    factor = vae_scale_factor(
        config.pretrained_vae_model_name_or_path or config.pretrained_model_name_or_path
    )
    if config.resolution % factor == 0:
        return
    below = config.resolution // factor * factor
    nearest = " or ".join(str(v) for v in (below, below + factor) if v > 0)
    raise ConfigError(
        f"--resolution {config.resolution} is not a multiple of {factor} (the base model's VAE downsamples by "
        f"{factor}); the smallest valid value is {factor}, the nearest {nearest}"
    )
