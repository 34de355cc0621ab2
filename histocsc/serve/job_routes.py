"""Slide jobs: submit (upload or a path under --slides-root), list, status, outputs, cancel."""

from __future__ import annotations

import json
import logging
import mimetypes
import shutil
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from histocsc.errors import HistocscError
from histocsc.serve.jobs import FINISHED, Job
from histocsc.serve.redact import redact, redactions
from histocsc.serve.schemas import CancelView, Deleted, JobList, JobState, JobView, errors
from histocsc.serve.security import HttpError, read_limited, resolve_slide, shorten
from histocsc.serve.service import Service, service
from histocsc.serve.upload import receive_form
from histocsc.wsi.slide import open_slide

log = logging.getLogger("histocsc.serve")
router = APIRouter(prefix="/v1/jobs", tags=["Slide jobs"])
MAX_JSON_BYTES = 65536
MEDIA_TYPES = {".geojson": "application/geo+json", ".json": "application/json",
               ".csv": "text/csv", ".npy": "application/octet-stream", ".png": "image/png",
               ".html": "text/html", ".txt": "text/plain"}
PATH_PATTERN = r"^/?([^/\x00]{1,255}/)*[^/\x00]{1,255}$"  # file names of 255 bytes at most
MPP = {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 100}

SUBMIT_BODY = {
    "description": "Either multipart/form-data with a `slide` file (streamed to disk) and an "
                   "optional `slide_mpp`, or JSON `{\"path\": \"relative/to/slides-root.svs\", "
                   "\"slide_mpp\": 0.25}` (`slide_mpp` only for files that lack a pixel size).",
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["slide"], "additionalProperties": False,
            "properties": {"slide": {"type": "string", "format": "binary"}, "slide_mpp": MPP}}},
        "application/json": {"schema": {
            "type": "object", "required": ["path"],
            "properties": {"path": {"type": "string", "minLength": 1, "maxLength": 1024,
                                    "pattern": PATH_PATTERN}, "slide_mpp": MPP}}},
    },
}
OUTPUT_CONTENT = {media: {"schema": {"type": "string", "format": "binary"}}
                  for media in sorted(set(MEDIA_TYPES.values()))}


def _job(svc: Service, job_id: str) -> Job:
    job = svc.store.get(job_id) if job_id.isalnum() else None
    if job is None:
        raise HttpError(404, f"no job {shorten(job_id)!r}")
    return job


def _view(svc: Service, job: Job) -> dict[str, Any]:
    out = job.public(svc.settings.slides_root)
    out["outputs"] = _outputs(svc, job) if job.state == "succeeded" else []
    return out


def _outputs(svc: Service, job: Job) -> list[str]:
    folder = svc.store.output_dir(job.id)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _slide_mpp(value: Any, text: bool) -> float | None:
    """slide_mpp from a form field (`text`) or a JSON number; 400 unless a positive size."""
    if value is None or (text and value == ""):
        return None
    if isinstance(value, bool) or not isinstance(value, str if text else (int, float)):
        raise HttpError(400, f"slide_mpp must be a number (µm/px), got {shorten(repr(value))}")
    try:
        mpp = float(value)
    except (ValueError, OverflowError):
        raise HttpError(400, f"slide_mpp must be a number (µm/px), got "
                             f"{shorten(repr(value))}") from None
    if not 0 < mpp < 100:
        raise HttpError(400, f"slide_mpp must be between 0 and 100 µm/px, got {shorten(str(mpp))}")
    return mpp


def _check_slide(path: Path, mpp: float | None, shown: str, max_px: int,
                 hide: list[Path]) -> float:
    """The slide's pixel size; 400 naming the file (as `shown`, no folder of `hide` in the
    message) if it cannot be opened, lacks a pixel size or declares more than `max_px` px a
    side."""
    try:
        with open_slide(path, fallback_mpp=mpp) as slide:
            width, height = slide.dimensions
            if max(width, height) > max_px:
                raise HttpError(400, f"{shown}: the slide declares {width} x {height} px; this "
                                     f"server takes at most {max_px} px a side (--max-slide-px)")
            if not slide.has_mpp:
                raise HttpError(400, f"{shown}: the slide does not record its pixel size; "
                                     "pass slide_mpp (µm/px)")
            return float(slide.mpp)
    except HistocscError as exc:
        raise HttpError(400, redact(str(exc), redactions(path, shown, path, hide))) from None
    except (HttpError, OSError):
        raise
    except Exception as exc:  # noqa: BLE001 - a reader library's own error on a bad file
        log.warning("%s: cannot be opened as a slide: %r", path, exc)
        raise HttpError(400, f"{shown}: cannot be opened as a slide") from None


async def _read_submission(request: Request, svc: Service, job_id: str
                           ) -> tuple[Path, str, float | None]:
    """(slide file, source, slide_mpp) of a submission, the upload saved in the job folder."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        length = request.headers.get("content-length", "")
        declared = int(length) if length.isdigit() else svc.max_upload_bytes
        if declared > svc.max_upload_bytes:
            raise HttpError(413, f"upload of {length} bytes exceeds the limit of "
                                 f"{svc.max_upload_bytes} bytes")
        with svc.admission.upload_bytes(declared):
            fields, upload = await receive_form(ctype, request.stream(),
                                                svc.store.folder(job_id) / "upload",
                                                svc.max_upload_bytes)
    elif ctype.startswith("application/json"):
        body = await read_limited(request.stream(), MAX_JSON_BYTES, "job request")
        try:
            fields = json.loads(body)
        except (ValueError, RecursionError):
            raise HttpError(400, "request body is not valid JSON (or nested too deeply)") from None
        if not isinstance(fields, dict):
            raise HttpError(400, "request body must be a JSON object with 'path'")
        upload = None
    else:
        raise HttpError(415, "send multipart/form-data with a 'slide' file, or JSON with 'path'")
    mpp = _slide_mpp(fields.get("slide_mpp"), text=ctype.startswith("multipart/"))
    path = fields.get("path")
    if (upload is None) == (path is None):
        raise HttpError(400, "give exactly one of a 'slide' upload or a 'path'")
    if upload is not None:
        return upload, "upload", mpp
    if not isinstance(path, str):
        raise HttpError(400, "'path' must be a string")
    return resolve_slide(svc.settings.slides_root, path), "path", mpp


def _shown(svc: Service, slide: Path, source: str) -> str:
    root = svc.settings.slides_root
    if source == "path" and root is not None:
        return str(slide.relative_to(root.resolve()))
    return slide.name


@router.post("", status_code=202, summary="Submit a slide job", response_model=JobView,
             openapi_extra={"requestBody": SUBMIT_BODY},
             responses={202: {"headers": {"Location": {"schema": {"type": "string"}}}},
                        **errors(400, 401, 403, 404, 413, 415, 429, 503, 507)})
async def submit(request: Request) -> JSONResponse:
    svc = service(request)
    with svc.admission.job_slot():
        job_id = svc.store.new_id()
        try:
            slide, source, mpp = await _read_submission(request, svc, job_id)
            shown = _shown(svc, slide, source)
            hide = [svc.store.folder(job_id), svc.settings.data,
                    *([svc.settings.slides_root] if svc.settings.slides_root else [])]
            mpp_used = await run_in_threadpool(_check_slide, slide, mpp, shown,
                                               svc.settings.max_slide_px, hide)
            job = await run_in_threadpool(svc.store.add, job_id, slide, source, mpp, mpp_used,
                                          svc.engine.mpp, svc.engine.checksum)
        except BaseException:
            shutil.rmtree(svc.store.folder(job_id), ignore_errors=True)
            raise
    svc.runner.wake()
    return JSONResponse(_view(svc, job), status_code=202,
                        headers={"Location": f"/v1/jobs/{job_id}"})


@router.get("", summary="List jobs (optionally of one state)", response_model=JobList,
            responses=errors(400, 401))
def list_jobs(request: Request, state: JobState | None = None) -> dict[str, Any]:
    svc = service(request)
    return {"jobs": [_view(svc, j) for j in svc.store.list(state)]}


@router.get("/{job_id}", summary="Job state, progress and outputs", response_model=JobView,
            responses=errors(401, 404))
def get_job(request: Request, job_id: str) -> dict[str, Any]:
    svc = service(request)
    return _view(svc, _job(svc, job_id))


@router.get("/{job_id}/outputs/{name}", summary="One output file of a finished job",
            response_class=FileResponse,
            responses={200: {"content": OUTPUT_CONTENT}, **errors(401, 404, 409)})
def get_output(request: Request, job_id: str, name: str) -> FileResponse:
    svc = service(request)
    job = _job(svc, job_id)
    if job.state != "succeeded":
        raise HttpError(409, f"job {job_id} is {job.state}; outputs exist once it succeeded")
    if name not in _outputs(svc, job):
        raise HttpError(404, f"job {job_id} has no output {shorten(name)!r}")
    suffix = Path(name).suffix.lower()
    media = MEDIA_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
    return FileResponse(svc.store.output_dir(job_id) / name, media_type=media)


@router.delete("/{job_id}", summary="Cancel a job and remove its files (or a finished job)",
               response_model=Deleted | CancelView, responses={
                   200: {"description": "Removed (a finished job), or cancelled (a queued one)",
                         "model": Deleted | CancelView},
                   202: {"description": "Cancelling: the running job stops within a second",
                         "model": CancelView},
                   **errors(401, 404, 503)})
def delete_job(request: Request, job_id: str) -> Response:
    svc = service(request)
    job = _job(svc, job_id)
    if job.state in FINISHED:
        svc.store.delete(job_id)
        return JSONResponse({"id": job_id, "deleted": True})
    outcome = svc.runner.cancel(job_id)
    status = 202 if outcome == "cancelling" else 200
    return JSONResponse({**_view(svc, _job(svc, job_id)), "cancel": outcome}, status_code=status)
