"""The project's error types. Each message is one line that names the problem; the CLI prints it after
``error:`` and exits 2, the service answers it as a JSON error.

- :class:`InputError`: bad user input (missing or corrupt file, wrong size, empty mask, unknown option ...).
- :class:`RequestError`: a request that does not fit the schema or the method (an ``InputError``; the
  service answers 422 instead of 400).
- :class:`CheckpointError`: a checkpoint that is missing, of the wrong kind, or pickle-based without
  permission (an ``InputError``).
- :class:`GenerationError`: a run that produced no usable image (NaN or infinite values); nothing is written.
"""

from __future__ import annotations

__all__ = ["InputError", "RequestError", "CheckpointError", "GenerationError", "first_line"]


class InputError(ValueError):
    """Bad user input. The message is one line."""


class RequestError(InputError):
    """A request that violates the schema, a method's options, or what the method supports."""


class CheckpointError(InputError):
    """A checkpoint that is missing, of the wrong kind, or pickle-based without permission."""


class GenerationError(RuntimeError):
    """A generation that went wrong in the models (NaN or infinite values), not in the input."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its class name. For a pydantic
    ``ValidationError`` (whose first line is only "1 validation error for X"): the first error's field and
    message."""
    errors = getattr(exc, "errors", None)
    if type(exc).__name__ == "ValidationError" and callable(errors) and errors():
        first = errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        message = str(first.get("msg", "")).replace("Value error, ", "")
        text = (f"{where}: {message}" if where else message).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
