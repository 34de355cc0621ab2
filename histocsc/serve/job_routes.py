"""Slide jobs: submit (upload or a path under --slides-root), list, status, outputs, cancel."""

from __future__ import annotations

import json
import mimetypes
import shutil
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from histocsc.errors import HistocscError
from histocsc.serve.jobs import FINISHED, STATES, Job
from histocsc.serve.security import HttpError, read_limited, resolve_slide
from histocsc.serve.service import Service, service
from histocsc.serve.upload import receive_form
from histocsc.wsi.slide import open_slide

router = APIRouter(prefix="/v1/jobs", tags=["Slide jobs"])
RETRY_AFTER_S = 30
MEDIA_TYPES = {".geojson": "application/geo+json", ".json": "application/json",
               ".csv": "text/csv", ".npy": "application/octet-stream"}

SUBMIT_BODY = {
    "description": "Either multipart/form-data with a `slide` file (streamed to disk) and an "
                   "optional `slide_mpp`, or JSON `{\"path\": \"relative/to/slides-root.svs\", "
                   "\"slide_mpp\": 0.25}` (`slide_mpp` only for files that lack a pixel size).",
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "slide": {"type": "string", "format": "binary"}, "slide_mpp": {"type": "number"}}}},
        "application/json": {"schema": {"type": "object", "properties": {
            "path": {"type": "string"}, "slide_mpp": {"type": "number"}}}},
    },
}


def _job(svc: Service, job_id: str) -> Job:
    job = svc.store.get(job_id) if job_id.isalnum() else None
    if job is None:
        raise HttpError(404, f"no job {job_id!r}")
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


def _slide_mpp(value: Any) -> float | None:
    if value in (None, ""):
        return None
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        raise HttpError(400, f"slide_mpp must be a number (µm/px), got {value!r}") from None
    if not 0 < mpp < 100:
        raise HttpError(400, f"slide_mpp must be between 0 and 100 µm/px, got {mpp}")
    return mpp


def _check_slide(path: Path, mpp: float | None, shown: str) -> float:
    """The slide's pixel size; 400 naming the file if it cannot be opened or lacks one."""
    try:
        with open_slide(path, fallback_mpp=mpp) as slide:
            if not slide.has_mpp:
                raise HttpError(400, f"{shown}: the slide does not record its pixel size; "
                                     "pass slide_mpp (µm/px)")
            return float(slide.mpp)
    except HistocscError as exc:
        raise HttpError(400, str(exc).replace(str(path), shown)) from None


async def _read_submission(request: Request, svc: Service, job_id: str
                           ) -> tuple[Path, str, float | None]:
    """(slide file, source, slide_mpp) of a submission, the upload saved in the job folder."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > svc.max_upload_bytes:
            raise HttpError(413, f"upload of {length} bytes exceeds the limit of "
                                 f"{svc.max_upload_bytes} bytes")
        fields, upload = await receive_form(ctype, request.stream(),
                                            svc.store.folder(job_id) / "upload",
                                            svc.max_upload_bytes)
    elif ctype.startswith("application/json"):
        try:
            fields = json.loads(await read_limited(request.stream(), 65536, "job request"))
        except ValueError as exc:
            raise HttpError(400, f"request body is not valid JSON ({exc})") from None
        if not isinstance(fields, dict):
            raise HttpError(400, "request body must be a JSON object with 'path'")
        upload = None
    else:
        raise HttpError(415, "send multipart/form-data with a 'slide' file, or JSON with 'path'")
    mpp = _slide_mpp(fields.get("slide_mpp"))
    path = fields.get("path")
    if (upload is None) == (path is None):
        raise HttpError(400, "give exactly one of a 'slide' upload or a 'path'")
    if upload is not None:
        return upload, "upload", mpp
    if not isinstance(path, str):
        raise HttpError(400, "'path' must be a string")
    return resolve_slide(svc.settings.slides_root, path), "path", mpp


@router.post("", status_code=202, summary="Submit a slide job",
             openapi_extra={"requestBody": SUBMIT_BODY})
async def submit(request: Request) -> JSONResponse:
    svc = service(request)
    waiting = svc.store.count("queued") + svc.store.count("running")
    if waiting >= svc.settings.max_queued_jobs:
        raise HttpError(429, f"{waiting} jobs already queued or running; retry later",
                        {"Retry-After": str(RETRY_AFTER_S)})
    job_id = svc.store.new_id()
    try:
        slide, source, mpp = await _read_submission(request, svc, job_id)
        shown = slide.name if source == "upload" else str(slide)
        mpp_used = await run_in_threadpool(_check_slide, slide, mpp, shown)
    except BaseException:
        shutil.rmtree(svc.store.folder(job_id), ignore_errors=True)
        raise
    job = svc.store.add(job_id, slide, source, mpp, mpp_used, svc.engine.mpp,
                        svc.engine.checksum)
    svc.runner.wake()
    return JSONResponse(_view(svc, job), status_code=202,
                        headers={"Location": f"/v1/jobs/{job_id}"})


@router.get("", summary="List jobs (optionally of one state)")
def list_jobs(request: Request, state: str | None = None) -> dict[str, Any]:
    svc = service(request)
    if state is not None and state not in STATES:
        raise HttpError(400, f"state must be one of {', '.join(STATES)}, got {state!r}")
    return {"jobs": [_view(svc, j) for j in svc.store.list(state)]}


@router.get("/{job_id}", summary="Job state, progress and outputs")
def get_job(request: Request, job_id: str) -> dict[str, Any]:
    svc = service(request)
    return _view(svc, _job(svc, job_id))


@router.get("/{job_id}/outputs/{name}", summary="One output file of a finished job")
def get_output(request: Request, job_id: str, name: str) -> FileResponse:
    svc = service(request)
    job = _job(svc, job_id)
    if job.state != "succeeded":
        raise HttpError(409, f"job {job_id} is {job.state}; outputs exist once it succeeded")
    if name not in _outputs(svc, job):
        raise HttpError(404, f"job {job_id} has no output {name!r}")
    suffix = Path(name).suffix.lower()
    media = MEDIA_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
    return FileResponse(svc.store.output_dir(job_id) / name, media_type=media)


@router.delete("/{job_id}", summary="Cancel a job and remove its files (or a finished job)")
def delete_job(request: Request, job_id: str) -> Response:
    svc = service(request)
    job = _job(svc, job_id)
    if job.state in FINISHED:
        svc.store.delete(job_id)
        return JSONResponse({"id": job_id, "deleted": True})
    outcome = svc.runner.cancel(job_id)
    status = 202 if outcome == "cancelling" else 200
    return JSONResponse({**_view(svc, _job(svc, job_id)), "cancel": outcome}, status_code=status)
