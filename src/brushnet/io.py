"""Writing files: atomic writes, PNGs that carry their generation parameters, and labelled image grids.

Every file the project writes goes through :func:`atomic_write`: a temporary file in the target's folder,
flushed and ``os.replace``-d into place, so a reader (or a crash, a full disk, a kill) never leaves a
half-written file, and a failure removes the temporary file; an image and its ``.json`` sidecar land together or
not at all (:func:`atomic_write_together`). Files get the permissions a plain ``open``
would give them (``0o666`` minus the umask), not a temporary file's ``0o600``.

Only the standard library and PIL are imported here, so CLI modules can import it at start-up.
"""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from .errors import InputError

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_together",
    "atomic_write_text",
    "check_output_path",
    "file_in_the_way",
    "is_sidecar",
    "is_brushnet_image",
    "png_bytes",
    "save_png_with_metadata",
    "read_png_metadata",
    "make_grid",
    "METADATA_CHUNK",
]

METADATA_CHUNK = "brushnet"
"""PNG text chunk holding a generation's full JSON record (method, seed, parameters, timings, calls)."""

_OS_REASONS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EISDIR: "a folder of that name exists",
    errno.ENOTDIR: "a parent of it is a file, not a folder",
    errno.ENAMETOOLONG: "file name too long",
}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _output_error(path: Path, exc: OSError) -> InputError:
    reason = _OS_REASONS.get(exc.errno or -1, exc.strerror or exc.__class__.__name__)
    return InputError(f"cannot write {path}: {reason}")


def _nearest_existing(folder: Path) -> Path:
    """``folder`` or the nearest folder above it that exists (what ``mkdir(parents=True)`` would start from)."""
    while not (folder.exists() or folder.is_symlink()) and folder != folder.parent:
        folder = folder.parent
    return folder


def file_in_the_way(folder: str | os.PathLike) -> Path | None:
    """The file at ``folder``, or the nearest existing path above it when that is a file (so ``folder`` cannot
    be made); ``None`` when ``folder`` is or can become a folder."""
    existing = _nearest_existing(Path(folder))
    return existing if existing.exists() and not existing.is_dir() else None


def check_output_path(path: str | os.PathLike) -> Path:
    """Check, before any work, that ``path`` can be written, without creating anything: it is not a folder, and
    its folder exists and is writable, or the nearest existing folder above it is a writable folder (not a file)
    in which :func:`atomic_write` will create the missing ones when it writes. So a run that fails before writing
    leaves no empty folder behind.

    Raises:
        InputError: one line naming the problem.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise InputError(f"cannot write {path}: a folder of that name exists")
        existing = _nearest_existing(path.parent)
        if not existing.is_dir():
            raise InputError(f"cannot write {path}: {existing} is a file, not a folder")
        try:
            name_max = os.pathconf(existing, "PC_NAME_MAX")
        except (OSError, ValueError, AttributeError):
            name_max = 255
        for part in (*path.parent.relative_to(existing).parts, path.name):
            if len(os.fsencode(part)) > name_max:
                raise InputError(f"cannot write {path}: file name too long ({part[:20]}…)")
    except OSError as exc:
        raise _output_error(path, exc) from None
    if not os.access(existing, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        except (OSError, AttributeError):
            read_only = False
        reason = "read-only file system" if read_only else "permission denied"
        raise InputError(f"cannot write {path}: {reason} (folder {existing})")
    return path


def is_sidecar(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``.json`` sidecar this project wrote (:func:`save_png_with_metadata`): a JSON object
    with a ``seed`` and ``parameters`` (one generation) or ``methods`` (a ``compare`` grid). A missing file is
    not one; a user's own ``.json`` of the same stem is not one either, so a command can refuse to replace it."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "seed" in record and ("parameters" in record or "methods" in record)


def is_brushnet_image(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an image this project wrote (:func:`png_bytes`): a PNG whose ``brushnet`` text chunk
    holds a JSON object. Read from the file's header chunks, without decoding the pixels. A missing or unreadable
    file, another format, or a PNG without the record (a user's photo) is not one, so a command can refuse to
    replace it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            record = json.loads(image.info.get(METADATA_CHUNK, "null"))
    except Exception:  # noqa: BLE001 - anything unreadable is not ours (PIL raises more than OSError)
        return False
    return isinstance(record, dict)


def _write_temporary(path: Path, write: Callable[[IO[bytes]], None]) -> str:
    """``write(file)`` into a new temporary file beside ``path`` (in its folder, which must exist), flushed to
    disk, with the permissions a plain ``open`` would give; returns its name. On any failure it is removed and
    the error raised as is."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def _remove(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the folders created, deepest first."""
    created = []
    missing = folder
    while not (missing.exists() or missing.is_symlink()) and missing != missing.parent:
        created.append(missing)
        missing = missing.parent
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _remove_empty(folders: Sequence[Path]) -> None:
    for folder in folders:  # deepest first; one that is not empty stays, and so do the ones above it
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then move it into place.

    The parent folder is created when missing. On any failure the temporary file is removed and the previous
    ``path`` (if any) is left as it was; an ``OSError`` (permission, full disk, a folder in the way) becomes an
    :class:`~brushnet.errors.InputError` with one line naming the file and the reason.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        tmp = _write_temporary(path, write)
    except OSError as exc:
        raise _output_error(path, exc) from None
    try:
        os.replace(tmp, path)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError):
            raise _output_error(path, exc) from None
        raise
    return path


def atomic_write_together(files: Sequence[tuple[str | os.PathLike, bytes]]) -> list[Path]:
    """Write several files (an image and its sidecar) so that they land together or not at all.

    Each is first written in full to a temporary file beside its target; only when every one is written are
    they moved into place, in the order given. On a failure while writing (a full disk, a permission, a folder
    in the way) every temporary file is removed, and so are the folders this call created: no target is touched
    and nothing is left behind. Should a move fail after the first (practically only when the folder vanishes),
    the targets already moved that did not exist before are removed again. An ``OSError`` becomes an
    :class:`~brushnet.errors.InputError` with one line naming the file and the reason.
    """
    targets = [(Path(path), data) for path, data in files]
    written: list[tuple[str, Path, bool]] = []  # temporary name, target, whether the target existed
    created: list[Path] = []
    current = targets[0][0] if targets else None
    try:
        for path, data in targets:
            current = path
            created += _make_folder(path.parent)
            if path.is_dir():
                raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
            tmp = _write_temporary(path, lambda handle, data=data: handle.write(data))
            written.append((tmp, path, path.exists()))
    except BaseException as exc:
        for tmp, _, _ in written:
            _remove(tmp)
        _remove_empty(created)
        if isinstance(exc, OSError):
            raise _output_error(current, exc) from None
        raise
    moved: list[tuple[Path, bool]] = []
    try:
        for tmp, path, existed in written:
            current = path
            os.replace(tmp, path)
            moved.append((path, existed))
    except BaseException as exc:
        for tmp, _, _ in written:
            _remove(tmp)
        for path, existed in moved:
            if not existed:
                _remove(path)
        if isinstance(exc, OSError):
            raise _output_error(current, exc) from None
        raise
    return [path for path, _ in targets]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def png_bytes(image, metadata: Mapping[str, Any] | None = None) -> bytes:
    """``image`` as PNG; with ``metadata``, its JSON in the ``brushnet`` text chunk, plus ``seed`` and
    ``method`` text chunks and the ``prompt`` (UTF-8 iTXt) when the record has them."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if metadata is not None:
        info = PngInfo()
        info.add_text(METADATA_CHUNK, json.dumps(metadata, sort_keys=True, default=str))
        for key in ("seed", "method"):
            if key in metadata:
                info.add_text(key, str(metadata[key]))
        prompt = (metadata.get("parameters") or {}).get("prompt")
        if prompt is not None:
            info.add_itxt("prompt", str(prompt))
        info.add_text("Software", "brushnet")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_png_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The generation record of a PNG written by :func:`png_bytes` (empty when missing or unreadable)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return json.loads(image.text.get(METADATA_CHUNK, "{}"))
    except (OSError, ValueError, AttributeError):
        return {}


def save_png_with_metadata(
    image, path: str | os.PathLike, metadata: Mapping[str, Any], sidecar: bool = True
) -> Path:
    """Save ``image`` as PNG with ``metadata`` (see :func:`png_bytes`) and, with ``sidecar``, the same record
    as ``<path>.json``. The two land together or not at all (:func:`atomic_write_together`): a failure (a full
    disk while the sidecar is written) leaves neither, and no temporary file."""
    path = Path(path)
    data = png_bytes(image, metadata)
    if not sidecar:
        atomic_write_bytes(path, data)
        return path
    record = (json.dumps(metadata, indent=2, default=str) + "\n").encode("utf-8")
    atomic_write_together([(path, data), (path.with_suffix(".json"), record)])
    return path


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` shortened with an ellipsis so that it fits ``width`` pixels."""
    if width <= 0 or draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def make_grid(
    rows: Sequence[Sequence[Any]],
    *,
    tile: int | tuple[int, int] | None = None,
    labels: Sequence[Sequence[str]] | None = None,
    column_titles: Sequence[str] | None = None,
    row_titles: Sequence[str] | None = None,
    title: str | None = None,
    pad: int = 0,
    font_size: int = 11,
    resample: str = "lanczos",
):
    """A labelled grid of images: the one grid maker of the project (compare, demo, bench report, validation).

    Args:
        rows: rows of PIL images; ``None`` leaves a blank cell.
        tile: cell size (``int`` = square); default the first image's size. Images are resized to fit the
            cell (aspect kept, top-left aligned) with ``resample`` (``"lanczos"`` or ``"nearest"``).
        labels: one text per cell, written in a strip above it.
        column_titles: one text per column, in a strip above the first row.
        row_titles: one text per row, in a strip above the row.
        title: one line above everything.
        pad: pixels between cells and around the grid.
    """
    from PIL import Image, ImageDraw

    first = next((image for row in rows for image in row if image is not None), None)
    if first is None:
        raise ValueError("make_grid needs at least one image")
    cell_w, cell_h = (tile, tile) if isinstance(tile, int) else (tile or first.size)
    strip = font_size + 3
    columns = max(len(row) for row in rows)
    title_h = strip + pad if title else 0
    column_h = strip if column_titles else 0
    row_h = (strip if row_titles else 0) + (strip if labels else 0) + cell_h + pad
    width = pad + columns * (cell_w + pad)
    canvas = Image.new("RGB", (width, pad + title_h + column_h + len(rows) * row_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(font_size)
    method = Image.Resampling.NEAREST if resample == "nearest" else Image.Resampling.LANCZOS
    top = pad
    if title:
        draw.text((pad + 2, top), title, fill=(0, 0, 0), font=font)
        top += title_h
    if column_titles:
        for c, text in enumerate(column_titles):
            draw.text(
                (pad + c * (cell_w + pad) + 2, top + 1),
                _fit(draw, text, font, cell_w - 4),
                fill=(0, 0, 0),
                font=font,
            )
        top += column_h
    for r, row in enumerate(rows):
        y = top + r * row_h
        if row_titles:
            draw.text((pad + 2, y + 1), row_titles[r], fill=(0, 0, 0), font=font)
            y += strip
        for c, image in enumerate(row):
            x = pad + c * (cell_w + pad)
            if labels:
                draw.text(
                    (x + 2, y + 1), _fit(draw, labels[r][c], font, cell_w - 4), fill=(0, 0, 0), font=font
                )
            if image is None:
                continue
            image = image.convert("RGB")
            if image.size != (cell_w, cell_h):
                scale = min(cell_w / image.width, cell_h / image.height)
                size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                image = image.resize(size, method)
            canvas.paste(image, (x, y + (strip if labels else 0)))
    return canvas
