"""Streaming multipart parsing of a slide upload straight to disk (python-multipart's parser).

The body is parsed chunk by chunk as it arrives: the file part goes to a file in the job's
folder, never whole into memory, and the upload is refused with 413 as soon as it passes the
size limit.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from histocsc.serve.security import HttpError, upload_name

FILE_FIELD = "slide"
TEXT_FIELDS = ("path", "slide_mpp")
MAX_FIELD_BYTES = 4096
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def storage_error(exc: OSError) -> HttpError:
    """507 when the disk is full, 503 for another failure to store the upload; no paths."""
    why = exc.strerror or exc.__class__.__name__
    if exc.errno in DISK_FULL:
        return HttpError(507, f"the server's disk is full: cannot store the upload ({why})",
                         {"Retry-After": "60"})
    return HttpError(503, f"the server cannot store the upload now ({why})",
                     {"Retry-After": "30"})


class _Receiver:
    """python-multipart callbacks: one file part written to `folder`, a few short text fields."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fields: dict[str, str] = {}
        self.file: Path | None = None
        self._headers: dict[bytes, bytes] = {}
        self._field, self._value = b"", b""
        self._name: str | None = None
        self._out: IO[bytes] | None = None
        self._text = bytearray()
        self.file_complete = False

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
            "on_header_field": self._header_field, "on_header_value": self._header_value,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_done,
        }

    def _begin(self) -> None:
        self._headers, self._name, self._text = {}, None, bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if filename is not None:
            if name != FILE_FIELD:
                raise HttpError(400, f"unexpected file field {name!r}; send the slide as "
                                     f"{FILE_FIELD!r}")
            if self.file is not None:
                raise HttpError(400, "send one slide file per job")
            self.folder.mkdir(parents=True, exist_ok=True)
            self.file = self.folder / upload_name(filename.decode("utf-8", "replace"))
            self._out = self.file.open("wb")
        elif name not in TEXT_FIELDS:
            raise HttpError(400, f"unexpected form field {name!r}; expected {FILE_FIELD!r}, "
                                 f"{', '.join(map(repr, TEXT_FIELDS))}")
        self._name = name

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._out is not None:
            self._out.write(data[start:end])
            return
        self._text += data[start:end]
        if len(self._text) > MAX_FIELD_BYTES:
            raise HttpError(400, f"form field {self._name!r} is longer than {MAX_FIELD_BYTES} "
                                 "bytes")

    def _end(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
            self.file_complete = True
        elif self._name is not None:
            self.fields[self._name] = self._text.decode("utf-8", "replace")

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


async def receive_form(content_type: str, chunks: AsyncIterator[bytes], folder: Path,
                       limit: int) -> tuple[dict[str, str], Path | None]:
    """Text fields and the uploaded slide (saved in `folder`) of a multipart/form-data body."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise HttpError(400, "multipart/form-data without a boundary")
    receiver = _Receiver(folder)
    parser = MultipartParser(boundary, receiver.callbacks())  # type: ignore[arg-type]
    size = 0
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"upload larger than the limit of {limit} bytes")
            await run_in_threadpool(parser.write, chunk)  # file writes off the event loop
        parser.finalize()
    except HttpError:
        raise
    except OSError as exc:  # writing the file: a full disk, an I/O error
        raise storage_error(exc) from None
    except Exception as exc:  # python-multipart raises its own types on a malformed body
        raise HttpError(400, f"malformed multipart body ({exc})") from None
    finally:
        try:
            receiver.close()
        except OSError as exc:  # the last buffered bytes did not fit
            raise storage_error(exc) from None
    if receiver.file is not None and not receiver.file_complete:
        raise HttpError(400, "the upload ended before the slide file was complete")
    return receiver.fields, receiver.file
