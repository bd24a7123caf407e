"""Command-line flags generated from the schemas, so no command copies them by hand.

- :func:`request_flags`: one flag per field of :class:`~brushnet.methods.InpaintRequest` (name and short
  forms from the field's ``json_schema_extra["cli"]``, else ``--<field-with-dashes>``; help from its
  description; ``options`` becomes the repeatable ``--option key=value``). The command receives ``request``:
  a dict of the request fields.
- :func:`model_flags`: one flag per :class:`~brushnet.methods.ModelSlot` that any registered method declares,
  plus the repeatable ``--lora PATH[:SCALE]`` and ``--allow-pickle``. The command receives ``models``: a dict for
  :class:`~brushnet.methods.ModelPaths` (``loras`` only when ``--lora`` is given).
- :func:`runtime_flags`: ``--device``, ``--dtype``, ``--threads``, ``--compile`` (and ``--quiet``). The command
  receives ``runtime``: a :class:`~brushnet.cli.common.Runtime`.

Each decorator appends its parameters to the command's signature (typer reads ``__signature__``), and the
wrapper gathers their values into the one keyword the command declares. Reading the declarations imports
pydantic and the method declarations only (no torch).
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import typer

from .common import Runtime, parse_options

__all__ = ["request_flags", "model_flags", "runtime_flags", "request_field_flags", "parse_lora"]


@dataclass
class _Flag:
    name: str  # the parameter name in the generated signature
    annotation: Any
    option: Any  # typer.Option(...)


def _extend(
    func: Callable, target: str, flags: list[_Flag], collect: Callable[[dict[str, Any]], Any]
) -> Callable:
    """``func`` with ``flags`` appended to its signature; their values reach ``func`` as ``target=collect(values)``."""
    signature = inspect.signature(func)
    if target not in signature.parameters:
        raise TypeError(f"{func.__name__} must declare a `{target}` parameter to receive the generated flags")
    hints = typing.get_type_hints(func)
    own = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in signature.parameters.values()
        if p.name != target
    ]
    taken = {p.name for p in own}
    generated = []
    for flag in flags:
        if flag.name in taken:
            raise TypeError(f"{func.__name__}: generated flag parameter {flag.name!r} clashes with its own")
        generated.append(
            inspect.Parameter(
                flag.name, inspect.Parameter.KEYWORD_ONLY, default=flag.option, annotation=flag.annotation
            )
        )
    names = [flag.name for flag in flags]

    @functools.wraps(func)
    def wrapper(**kwargs):
        values = {name: kwargs.pop(name) for name in names}
        kwargs[target] = collect(values)
        return func(**kwargs)

    parameters = [p for p in own if p.kind != inspect.Parameter.KEYWORD_ONLY]
    parameters += [p for p in own if p.kind == inspect.Parameter.KEYWORD_ONLY] + generated
    parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in parameters]
    wrapper.__signature__ = signature.replace(parameters=parameters)
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    del wrapper.__wrapped__  # typer must read the generated signature, not the original one
    return wrapper


def request_field_flags(name: str, field) -> list[str]:
    """The flag names of request field ``name`` (long form first)."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return list(extra.get("cli") or ["--" + name.replace("_", "-")])


_CONTEXT = "brushnet_request_context"  # the click context, for the alias check of request_flags


def _alias_parameter(alias: str) -> str:
    return "alias_" + alias.lstrip("-").replace("-", "_")


def request_flags(
    exclude: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
    help: Mapping[str, str] | None = None,
    panel: str = "Request",
    per_method_options: bool = False,
) -> Callable[[Callable], Callable]:
    """Add one flag per request field (except ``exclude``); the command receives ``request`` (a dict).

    Args:
        exclude: fields the command sets itself (it must say why in its docstring or help).
        defaults: other defaults for this command (e.g. the benchmark protocol's).
        help: other help texts for this command.
        per_method_options: leave ``--option`` values as the list given (``method:key=value`` forms are split
            per method by the command: :func:`~brushnet.cli.common.split_options`).
    """
    from ..methods.base import InpaintRequest

    exclude, defaults, help = set(exclude), dict(defaults or {}), dict(help or {})
    unknown = (exclude | set(defaults) | set(help)) - set(InpaintRequest.model_fields)
    if unknown:
        raise TypeError(f"request_flags: unknown request fields {sorted(unknown)}")

    def decorate(func: Callable) -> Callable:
        flags = []
        alias_of: dict[
            str, tuple[str, str, str, Any]
        ] = {}  # parameter -> (field, its flag, the alias, default)
        for name, field in InpaintRequest.model_fields.items():
            if name in exclude:
                continue
            decls = request_field_flags(name, field)
            text = help.get(name, field.description or "")
            default = defaults.get(name, None if field.default_factory is not None else field.default)
            if name in defaults and name not in help and "; unset: " in text:
                # the command's own default replaces what an unset field would mean (the benchmark's 7.5)
                text = text.split("; unset: ")[0] + "."
            if name == "options":
                text = help.get(name, "Method option key=value (repeatable; see `brushnet methods`).")
                flags.append(
                    _Flag(
                        name, list[str] | None, typer.Option(None, *decls, help=text, rich_help_panel=panel)
                    )
                )
                continue
            annotation = field.annotation
            if annotation is bool:
                long, *short = decls
                decls = [f"{long}/--no-{long[2:]}" if default else long, *short]
            else:
                # a second long name (``--guidance-scale``, diffusers' word) is its own hidden flag: shown beside
                # the first, typer's help cut both to "--guidance,--guidanc…" on an 80-column terminal
                aliases = [d for d in decls[1:] if d.startswith("--")]
                decls = [d for d in decls if d not in aliases]
                if aliases:
                    text = f"{text} Also {', '.join(aliases)}."
                    for alias in aliases:
                        flags.append(
                            _Flag(
                                _alias_parameter(alias),
                                annotation | None,
                                typer.Option(None, alias, hidden=True, show_default=False),
                            )
                        )
                        alias_of[_alias_parameter(alias)] = (name, decls[0], alias, default)
                    # the context tells a value given on the command line from the default (below)
                    if not any(flag.name == _CONTEXT for flag in flags):
                        flags.append(_Flag(_CONTEXT, typer.Context, inspect.Parameter.empty))
            option = typer.Option(
                default, *decls, help=text, rich_help_panel=panel, show_default=default is not None
            )
            flags.append(_Flag(name, annotation, option))

        def collect(values: dict[str, Any]) -> dict[str, Any]:
            from ..errors import InputError

            context = values.pop(_CONTEXT, None)
            for parameter, (name, flag, alias, _default) in alias_of.items():
                value = values.pop(parameter)
                if value is None:
                    continue
                # by name: typer's vendored click has its own ParameterSource enum
                source = context.get_parameter_source(name) if context is not None else None
                given = getattr(source, "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")
                if given and values[name] != value:  # both names given, even the default under one of them
                    raise InputError(
                        f"{flag} {values[name]} and {alias} {value} are one setting; give one of them"
                    )
                values[name] = value
            if "options" in values:
                values["options"] = (
                    list(values["options"] or []) if per_method_options else parse_options(values["options"])
                )
            return values

        return _extend(func, "request", flags, collect)

    return decorate


def parse_lora(value: str) -> dict[str, Any]:
    """``--lora PATH[:SCALE]`` → ``{"path": PATH, "scale": SCALE}`` (scale 1.0 when none is given). A value that
    names an existing file or folder is a path whole (``C:\\loras\\x.safetensors``, ``a:b.safetensors``).

    Raises:
        InputError: a SCALE that is not a finite number, or no PATH (one line naming the flag).
    """
    import math
    from pathlib import Path

    from ..errors import InputError

    path, colon, scale = value.rpartition(":")
    if not colon or Path(value).expanduser().exists() or "/" in scale or "\\" in scale:
        return {"path": value, "scale": 1.0}
    try:
        number = float(scale)
    except ValueError:
        number = None
    if number is None or not math.isfinite(number):
        raise InputError(
            f"--lora {value}: SCALE {scale!r} is not a finite number (--lora PATH[:SCALE], e.g. style.safetensors:0.8)"
        )
    if not path:
        raise InputError(f"--lora {value}: no PATH (--lora PATH[:SCALE])")
    return {"path": path, "scale": number}


def model_flags(panel: str = "Models") -> Callable[[Callable], Callable]:
    """Add one flag per model slot any method declares, the repeatable ``--lora PATH[:SCALE]`` and
    ``--allow-pickle``; the command receives ``models`` (a dict of the given paths, ``loras`` when given, and
    ``allow_pickle``)."""
    from ..methods.registry import model_slots

    def decorate(func: Callable) -> Callable:
        flags = [
            _Flag(name, str | None, typer.Option(None, slot.flag, help=slot.help, rich_help_panel=panel))
            for name, slot in model_slots().items()
        ]
        flags.append(
            _Flag(
                "lora",
                list[str] | None,
                typer.Option(
                    None,
                    "--lora",
                    metavar="PATH[:SCALE]",
                    help="LoRA fused at SCALE (default 1.0) into the UNet the method denoises with (the base's; "
                    "sd-inpainting, hd-painter, PowerPaint v1: the inpainting model's): a .safetensors file, a folder "
                    "holding one or a hub id, of the base's family (repeatable; applied in order). Recorded with the "
                    "result.",
                    rich_help_panel=panel,
                ),
            )
        )
        flags.append(
            _Flag(
                "allow_pickle",
                bool,
                typer.Option(
                    False,
                    "--allow-pickle",
                    help="Also load pickle-based .bin/.ckpt weights where no .safetensors exist (runs code: "
                    "only for files you trust).",
                    rich_help_panel=panel,
                ),
            )
        )

        def collect(values: dict[str, Any]) -> dict[str, Any]:
            loras = [parse_lora(value) for value in values.pop("lora") or []]
            models = {k: v for k, v in values.items() if v is not None}
            return {**models, "loras": loras} if loras else models

        return _extend(func, "models", flags, collect)

    return decorate


def runtime_flags(
    quiet: bool = True, dtype: bool = True, compile: bool = True, panel: str = "Runtime"
) -> Callable[[Callable], Callable]:
    """Add ``--device``, ``--dtype``, ``--threads``, ``--compile`` (and ``--quiet``); the command receives
    ``runtime`` and loads its methods through :meth:`~brushnet.cli.common.Runtime.load_method`."""

    def decorate(func: Callable) -> Callable:
        flags = [
            _Flag(
                "device",
                str,
                typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps.", rich_help_panel=panel),
            ),
            _Flag(
                "threads",
                int | None,
                typer.Option(
                    None,
                    "--threads",
                    help="CPU threads for torch (default: OMP_NUM_THREADS if set, else the CPUs available to this process).",
                    rich_help_panel=panel,
                ),
            ),
        ]
        if dtype:
            flags.append(
                _Flag(
                    "dtype",
                    str,
                    typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16.", rich_help_panel=panel),
                )
            )
        if compile:
            flags.append(
                _Flag(
                    "compile",
                    bool,
                    typer.Option(
                        False,
                        "--compile",
                        help="Compile the denoising step (torch.compile; CUDA graphs on a GPU). The first image "
                        "of each size compiles (minutes cold, seconds from the on-disk cache); see docs/speed.md.",
                        rich_help_panel=panel,
                    ),
                )
            )
        if quiet:
            flags.append(
                _Flag(
                    "quiet",
                    bool,
                    typer.Option(False, "--quiet", "-q", help="No progress bar.", rich_help_panel=panel),
                )
            )

        def collect(values: dict[str, Any]) -> Runtime:
            return Runtime(**values)

        return _extend(func, "runtime", flags, collect)

    return decorate
