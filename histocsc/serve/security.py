"""Request safety: API key, slide paths confined to --slides-root, upload names, body limits."""

from __future__ import annotations

import errno
import hmac
from collections.abc import AsyncIterator
from pathlib import Path

from histocsc.errors import ConfigError
from histocsc.wsi.discover import SLIDE_SUFFIXES

MAX_NAME_BYTES = 200  # an upload's file name (file systems allow 255)
MAX_PATH_CHARS = 1024  # a slide path of a path job


class HttpError(Exception):
    """An error answered as {"error": message} with `status` (and optional headers)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def load_api_key(path: Path) -> bytes:
    """The key in `path` (first line, stripped); ConfigError if missing or empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the API key file ({exc})") from exc
    lines = text.strip().splitlines()
    key = lines[0].strip() if lines else ""
    if len(key) < 16:
        raise ConfigError(f"{path}: the API key must be at least 16 characters on the first line")
    return key.encode()


def authorized(header: str | None, key: bytes) -> bool:
    """True if `header` is `Bearer <key>`; the comparison takes constant time."""
    scheme, _, given = (header or "").partition(" ")
    ok_scheme = scheme.lower() == "bearer"
    return hmac.compare_digest(given.strip().encode(), key) and ok_scheme


def shorten(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters for a message."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def resolve_slide(root: Path | None, user_path: str) -> Path:
    """The slide file `user_path` names, relative to `root` or absolute, following symlinks;
    403 if it lies outside `root` (or no root is configured), 404 if it does not exist, 400 if
    the path cannot be a file name here (too long, a symlink loop)."""
    if root is None:
        raise HttpError(403, "slide paths are disabled: start the server with --slides-root DIR")
    if not user_path or "\x00" in user_path:
        raise HttpError(400, "'path' must be a non-empty slide path")
    shown = shorten(user_path)
    if len(user_path) > MAX_PATH_CHARS:
        raise HttpError(400, f"{shown}: path longer than {MAX_PATH_CHARS} characters")
    base = root.resolve()
    try:
        target = (base / user_path).resolve()
        inside = target.is_relative_to(base)
        exists = inside and target.is_file()
    except RuntimeError:  # Python < 3.13: a symlink loop
        raise HttpError(400, f"{shown}: a symlink loop") from None
    except ValueError:  # a character the file system cannot encode (a lone surrogate)
        raise HttpError(400, f"{shown}: not a usable file name") from None
    except OSError as exc:
        why = {errno.ENAMETOOLONG: "a file name in it is too long",
               errno.ELOOP: "a symlink loop"}.get(exc.errno or 0, exc.strerror or "unreadable")
        raise HttpError(400, f"{shown}: {why}") from None
    if not inside:
        raise HttpError(403, f"{shown}: outside the slides root")
    if not exists:
        raise HttpError(404, f"{shown}: no such slide file under the slides root")
    return target


def upload_name(filename: str | None) -> str:
    """A safe file name for an uploaded slide: its base name, with a slide suffix."""
    name = Path((filename or "").replace("\\", "/")).name
    if not name or name.startswith(".") or "\x00" in name:
        raise HttpError(400, f"upload file name {shorten(repr(filename))} is not usable")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise HttpError(400, f"upload file name {shorten(name)} is longer than "
                             f"{MAX_NAME_BYTES} bytes")
    if Path(name).suffix.lower() not in SLIDE_SUFFIXES:
        raise HttpError(400, f"{name}: not a slide file (expected one of "
                             f"{', '.join(sorted(SLIDE_SUFFIXES))})")
    return name


async def read_limited(chunks: AsyncIterator[bytes], limit: int, what: str) -> bytes:
    """The whole body, refusing with 413 as soon as it exceeds `limit` bytes."""
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"{what} larger than {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)
