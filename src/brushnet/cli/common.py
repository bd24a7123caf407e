"""What every command shares: the one-line error exit, the progress bar, option parsing, output paths, and the
runtime settings (device, dtype, CPU threads).

Only the standard library, typer and light project modules are imported at module level, so ``--help`` stays
instant.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from ..errors import GenerationError, InputError, first_line

__all__ = [
    "fail",
    "guarded",
    "silence_library_noise",
    "quiet_library_progress",
    "StepBar",
    "Runtime",
    "available_cpus",
    "parse_options",
    "split_options",
    "output_paths",
    "refuse_overwriting_inputs",
    "refuse_replacing_other_json",
    "refuse_replacing_other_images",
    "refuse_unused_models",
    "refuse_models_no_method_reads",
    "set_flag_help",
    "IMAGE_SUFFIXES",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")  # what inpaint -i reads
DEBUG_ENV = "BRUSHNET_DEBUG"


class _DropLines(logging.Filter):
    """Drops log records whose message contains any of ``fragments``."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


LIBRARY_NOISE = {
    # every command: the image processors fall back to their PIL versions, which are the ones this project uses
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
    # every prompt is truncated to the text encoder's length, which diffusers reports on its own line
    "transformers.tokenization_utils_base": (
        "Running this sequence through the model will result in indexing",
    ),
    # a tokenizer-config detail diffusers triggers when it quotes the truncated words: nothing a user can change
    "transformers.tokenization_utils_tokenizers": ("Ignoring clean_up_tokenization_spaces=True for BPE",),
    # diffusers' SDXL pipelines cast a force_upcast VAE with .to(dtype) and warn about its fp32-kept modules even
    # when there are none (an empty list): nothing is wrong
    "diffusers.models.modeling_utils": ("that should be kept in float32: []",),
}
"""Library log lines that tell a user nothing to act on, by logger name (see :func:`silence_library_noise`)."""


def silence_library_noise() -> None:
    """Drop the :data:`LIBRARY_NOISE` lines (their loggers get a filter; nothing else is silenced). Idempotent."""
    for name, fragments in LIBRARY_NOISE.items():
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in target.filters):
            target.addFilter(_DropLines(*fragments))


def quiet_library_progress() -> None:
    """No progress bars from transformers, diffusers and huggingface_hub ("Loading weights", "Loading pipeline
    components", ...): what ``--quiet`` promises."""
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def fail(message: str, code: int = 2) -> None:
    """Print ``error: <message>`` on stderr and exit with ``code`` (2: bad input or usage)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def guarded(command: Callable) -> Callable:
    """Wrap a command so that no error ends in a traceback: bad input (:class:`~brushnet.errors.InputError`,
    ``ValueError``, ``OSError``) is one line and exit code 2; anything else is one line naming the exception and
    exit code 1 (``BRUSHNET_DEBUG=1`` shows the traceback); Ctrl-C exits 130."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except (InputError, ValueError, OSError) as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            fail(first_line(exc))
        except GenerationError as exc:  # the models' fault, not the input's, and no internal error either
            if os.environ.get(DEBUG_ENV):
                raise
            fail(first_line(exc), 1)
        except Exception as exc:  # noqa: BLE001 - the CLI's contract: one line, never a traceback
            if os.environ.get(DEBUG_ENV):
                raise
            fail(
                f"internal error: {type(exc).__name__}: {first_line(exc)} (set {DEBUG_ENV}=1 for details)", 1
            )

    return wrapper


class StepBar:
    """A tqdm bar on stderr driven by a method's ``on_step(done, total)`` callback. Nothing is drawn until the
    first step, and nothing at all with ``quiet``."""

    def __init__(self, desc: str, quiet: bool):
        self.desc, self.quiet, self.bar = desc, quiet, None

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="step", file=sys.stderr, leave=False)
        if self.bar.total != total:
            self.bar.reset(total=total)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> StepBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, bounded by a cgroup CPU quota (v2 ``cpu.max`` or v1
    ``cpu.cfs_quota_us``) when one is set."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    quota = None
    try:
        fields = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if fields and fields[0] != "max":
            quota = int(fields[0]) / int(fields[1])
    except (OSError, ValueError, IndexError):
        try:
            value = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            quota = value / period if value > 0 else None
        except (OSError, ValueError):
            quota = None
    if quota is not None:
        count = min(count, max(1, int(quota)))
    return max(1, count)


@dataclass
class Runtime:
    """Where and how models run: ``device``, ``dtype``, the CPU threads torch may use, and whether the denoising
    network is compiled (``--compile``: :meth:`brushnet.methods.InpaintMethod.compile`)."""

    device: str = "cpu"
    dtype: str = "fp32"
    threads: int | None = None
    quiet: bool = False
    compile: bool = False

    def load_method(self, name: str, models: Any, device: str | None = None, dtype: Any = None) -> Any:
        """:func:`brushnet.methods.load_method` on this runtime's device and dtype, compiled with ``--compile``.

        ``device``/``dtype`` override the runtime's (the benchmark runner passes its own), so this is also a
        ``load`` function for :func:`brushnet.bench.runner.run_benchmark`."""
        from ..methods import ModelPaths, get_method_class, load_method

        if isinstance(models, dict):  # a set for several methods (compare, bench): the paths this one reads
            models = ModelPaths(**models).used_by(get_method_class(name))
        method = load_method(name, models, device=device or self.device, dtype=dtype or self.dtype)
        if self.compile:
            compiled = method.compile()
            if compiled:
                logger.info(
                    "%s: compiled %s (the first call per image size compiles)", name, ", ".join(compiled)
                )
        return method

    def check(self) -> None:
        """Refuse an unknown dtype or a device this machine does not have, before any model is loaded."""
        from ..devices import resolve_device
        from ..loading import resolve_dtype

        resolve_dtype(self.dtype)
        resolve_device(self.device)

    def apply(self) -> None:
        """Check, then set torch's thread pools: ``threads`` (default: ``OMP_NUM_THREADS`` when set, else the
        CPUs available to the process) for intra-op work and one inter-op thread, so parallel regions never
        oversubscribe the CPUs. With ``quiet``, the libraries' loading bars are off too."""
        self.check()
        if self.quiet:
            quiet_library_progress()
        import torch

        threads = self.threads
        if threads is None:
            env = os.environ.get("OMP_NUM_THREADS", "")
            threads = int(env) if env.isdigit() and int(env) > 0 else available_cpus()
        if threads < 1:
            raise InputError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set once in this process (tests, a second command)
            pass


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["conditioning_scale=0.8", "guess_mode=true"]`` → ``{"conditioning_scale": 0.8, "guess_mode": True}``.

    Values are parsed as JSON when they parse (numbers, true/false, null, lists), else kept as strings.
    """
    options: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise InputError(f"--option needs key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise InputError(f"--option needs key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def split_options(pairs: list[str] | None, names: list[str]) -> dict[str, dict[str, Any]]:
    """``--option key=value`` applies to every method of ``names``; ``--option method:key=value`` to that one."""
    per_method: dict[str, list[str]] = {name: [] for name in names}
    for pair in pairs or []:
        head, _, _ = pair.partition("=")
        if ":" in head:
            name, _, rest = pair.partition(":")
            if name not in per_method:
                raise InputError(
                    f"--option {pair!r} names method {name!r}, which is not among {', '.join(names)}"
                )
            per_method[name].append(rest)
        else:
            for name in names:
                per_method[name].append(pair)
    return {name: parse_options(items) for name, items in per_method.items()}


def output_paths(output: str | os.PathLike, count: int) -> list[Path]:
    """``out.png`` for one image; ``out-0.png, out-1.png, ...`` for several."""
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise InputError(f"output must be a .png file, got {output.name}")
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def refuse_overwriting_inputs(outputs: list[Path], inputs: list[Path], overwrite: bool) -> None:
    """An output that is one of the inputs (same file, or the image/mask folder for a folder output) is refused
    unless ``overwrite``: nothing a user passed in is replaced by surprise."""
    if overwrite:
        return
    resolved = {Path(p).resolve(): Path(p) for p in inputs if p is not None}
    for path in outputs:
        for candidate in (path, path.with_suffix(".json")):
            original = resolved.get(Path(candidate).resolve())
            if original is not None:
                raise InputError(
                    f"output {candidate} would overwrite the input {original}; choose another --output "
                    "(or pass --overwrite)"
                )


def refuse_replacing_other_json(outputs: list[Path], overwrite: bool) -> None:
    """A ``.json`` sidecar path that holds a file this project did not write (a user's ``settings.json`` beside
    ``-o settings.png``; see :func:`brushnet.io.is_sidecar`) is refused unless ``overwrite``. A previous run's
    sidecar is replaced as before."""
    if overwrite:
        return
    from ..io import is_sidecar

    for path in outputs:
        sidecar = Path(path).with_suffix(".json")
        if sidecar.is_file() and not is_sidecar(sidecar):
            raise InputError(
                f"{sidecar} exists and is not a brushnet sidecar: the record written beside {Path(path).name} "
                "would replace it; choose another --output (or pass --overwrite)"
            )


def refuse_replacing_other_images(outputs: list[Path], overwrite: bool) -> None:
    """An output image path that holds a file this project did not write (a user's ``photo.png``; see
    :func:`brushnet.io.is_brushnet_image`: a PNG carrying the ``brushnet`` record) is refused unless
    ``overwrite``. A previous run's image is replaced as before."""
    if overwrite:
        return
    from ..io import is_brushnet_image

    for path in outputs:
        path = Path(path)
        if (path.is_file() or path.is_symlink()) and not is_brushnet_image(path):
            raise InputError(
                f"{path} exists and was not written by brushnet (no brushnet record in it): the output would "
                "replace it; choose another --output (or pass --overwrite)"
            )


def refuse_unused_models(models: dict[str, Any], method_cls: Any) -> None:
    """A model flag that ``method_cls`` does not read is one line naming it
    (:meth:`brushnet.methods.ModelPaths.refuse_unused`). ``compare``, which runs several methods, takes the whole
    set: it calls :func:`refuse_models_no_method_reads` instead."""
    from ..methods import ModelPaths

    ModelPaths(**models).refuse_unused(method_cls)


def refuse_models_no_method_reads(models: dict[str, Any], method_classes: list[Any]) -> None:
    """For a command that gives one set of model flags to several methods (``compare``): a flag that none of
    ``method_classes`` reads is one line naming it and what they read (a flag some method reads is fine)."""
    from ..methods import ModelPaths
    from ..methods.registry import model_slots

    unused = ModelPaths(**models).unread(*method_classes)
    if not unused:
        return
    slots = model_slots()
    given = ", ".join(slots[name].flag for name in unused)
    reads: dict[str, str] = {}  # flag -> as listed: required by some method, else [optional]
    for cls in method_classes:
        for slot in cls.models:
            reads[slot.flag] = slot.flag
        for slot in cls.optional_models:
            reads.setdefault(slot.flag, f"[{slot.flag}]")
    names = ", ".join(cls.name for cls in method_classes)
    verb, pronoun = ("is", "it") if len(unused) == 1 else ("are", "them")
    raise InputError(
        f"{given} {verb} not used by any of the methods {names} (they read {', '.join(reads.values()) or 'no model'}); "
        f"drop {pronoun} or add a method that reads {pronoun} to --methods"
    )


def set_flag_help(command: Callable, name: str, text: str) -> None:
    """Replace the help of the generated flag ``name`` (a parameter of ``command``'s signature, e.g. a model slot
    whose shared help names a flag this command does not have)."""
    import inspect

    inspect.signature(command).parameters[name].default.help = text
