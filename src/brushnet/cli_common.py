"""Helpers shared by the CLI commands: option parsing and atomic output writing.

Only the standard library and PIL are imported at module level, so ``brushnet --help`` stays instant.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["parse_options", "atomic_write_bytes", "save_png_with_metadata", "output_paths"]


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["conditioning_scale=0.8", "guess_mode=true"]`` → ``{"conditioning_scale": 0.8, "guess_mode": True}``.

    Values are parsed as JSON when they parse (numbers, true/false, null, lists), else kept as strings.
    """
    options: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--option needs key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise ValueError(f"--option needs key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``: a reader
    never sees a half-written file, and a crash leaves the previous file (if any) intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_png_with_metadata(
    image, path: str | os.PathLike, metadata: dict[str, Any], sidecar: bool = True
) -> None:
    """Save ``image`` as PNG with ``metadata`` in its text chunks (``brushnet`` = full JSON, plus ``seed``,
    ``prompt``, ``method``) and, with ``sidecar``, a ``.json`` next to it; both written atomically."""
    import io

    from PIL.PngImagePlugin import PngInfo

    text = json.dumps(metadata, sort_keys=True, default=str)
    info = PngInfo()
    info.add_text("brushnet", text)
    for key in ("seed", "method"):
        if key in metadata:
            info.add_text(key, str(metadata[key]))
    prompt = metadata.get("parameters", {}).get("prompt")
    if prompt is not None:
        info.add_itxt("prompt", str(prompt))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    path = Path(path)
    if sidecar:
        atomic_write_bytes(
            path.with_suffix(".json"), (json.dumps(metadata, indent=2, default=str) + "\n").encode()
        )
    atomic_write_bytes(path, buffer.getvalue())


def output_paths(output: str | os.PathLike, count: int) -> list[Path]:
    """``out.png`` for one image; ``out-0.png, out-1.png, ...`` for several."""
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise ValueError(f"output must be a .png file, got {output.name}")
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]
