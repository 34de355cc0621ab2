"""The OpenAPI description of `histocsc serve`: typed response bodies and the real status codes.

Schema-based tools (Schemathesis, generated clients) read `/openapi.json`; every status a route
can send is listed with its body, and FastAPI's 422 (this server answers 400) is removed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ErrorBody(BaseModel):
    error: str = Field(description="What is wrong, naming the file or field")


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool
    reasons: list[str] = Field(default_factory=list, description="Why not, when not ready")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, str | float | int]


class ModelReady(BaseModel):
    name: str
    ready: bool


class OutputTensor(BaseModel):
    name: str
    datatype: Literal["FP32"]
    shape: list[int]
    data: list[float] | None = None
    parameters: dict[str, int] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[OutputTensor]


class JobView(BaseModel):
    id: str
    state: JobState
    created: float
    started: float | None
    finished: float | None
    slide: str = Field(description="As the client named it: relative to --slides-root, or "
                                   "the upload's file name")
    source: Literal["path", "upload"]
    slide_mpp: float | None
    mpp_used: float | None
    model_mpp: float | None
    model_checksum: str
    tiles_done: int
    tiles_total: int | None
    error: str | None
    outputs: list[str]


class CancelView(JobView):
    cancel: Literal["cancelled", "cancelling"]


class JobList(BaseModel):
    jobs: list[JobView]


class Deleted(BaseModel):
    id: str
    deleted: bool


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for error statuses: each a JSON {"error": ...} body."""
    words = {400: "Bad request (the message names the problem)", 401: "Missing or wrong API key",
             403: "Slide path outside --slides-root, or slide paths disabled",
             404: "No such model, job, output or slide", 408: "Request headers too slow",
             409: "The job has not succeeded", 413: "Body larger than the limit",
             415: "Unsupported content type", 429: "Too busy; retry after Retry-After seconds",
             503: "Not ready, or the data folder cannot be written now",
             507: "The server's disk is full"}
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        out[code] = {"model": ErrorBody, "description": words[code]}
        if code in (429, 503):
            out[code]["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                                    "description": "Seconds to wait"}}
    return out


def clean_openapi(schema: dict[str, Any], secured: bool) -> dict[str, Any]:
    """Drop FastAPI's 422 (never sent) and declare the bearer key when the server has one."""
    for item in schema.get("paths", {}).values():
        for op in item.values():
            if isinstance(op, dict):
                op.get("responses", {}).pop("422", None)
    comps = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        comps.pop(name, None)
    if secured:
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"}}
        for path, item in schema.get("paths", {}).items():
            if path not in ("/v2/health/live", "/v2/health/ready"):
                for op in item.values():
                    op["security"] = [{"bearer": []}]
    return schema
