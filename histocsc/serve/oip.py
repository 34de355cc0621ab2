"""Open Inference Protocol (KServe v2 REST) routes: health, server and model metadata, infer.

The protocol of Triton, KServe and MLServer, so their clients (e.g. `tritonclient.http`) work
unchanged. The one model is served under `--model-name` (default `histocsc`), version 1.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request, Response

from histocsc import __version__
from histocsc.serve.batching import Overloaded
from histocsc.serve.protocol import (
    HEADER_LENGTH,
    INPUT,
    OUTPUT,
    BadRequest,
    decode_request,
    encode_response,
)
from histocsc.serve.schemas import (
    InferResponse,
    Live,
    ModelMetadata,
    ModelReady,
    Ready,
    ServerMetadata,
    errors,
)
from histocsc.serve.security import HttpError, read_limited
from histocsc.serve.service import MODEL_VERSION, Service, service

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])
# json.dumps of nested uint8 lists takes up to 17 bytes a pixel ("[255, 255, 255], ", 5.7 a
# value); 8 leaves room for other ordinary formatting (indentation aside)
JSON_BYTES_PER_VALUE = 8
LOOP_PARSE_BYTES = 65536  # a larger JSON header is parsed in a thread, off the event loop


INFER_BODY = {
    "description": "JSON `{inputs: [{name: tiles, datatype: UINT8, shape: [N, H, W, 3], data: "
                   "[...]}]}`, or Triton's binary-tensor extension (header "
                   "`Inference-Header-Content-Length`).",
    "required": True,
    "content": {"application/json": {"schema": {
        "type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"},
            "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                "type": "object", "required": ["name", "datatype", "shape"], "properties": {
                    "name": {"type": "string", "enum": [INPUT]},
                    "datatype": {"type": "string", "enum": ["UINT8"]},
                    "shape": {"type": "array", "items": {"type": "integer"}, "minItems": 4,
                              "maxItems": 4},
                    "parameters": {"type": "object"},
                    "data": {"type": "array"}}}},
            "outputs": {"type": "array", "items": {
                "type": "object", "required": ["name"], "properties": {
                    "name": {"type": "string", "enum": [OUTPUT]},
                    "parameters": {"type": "object"}}}},
            "parameters": {"type": "object"}}}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}
NAME_PARAM = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
INFER_RESPONSES = {
    200: {"model": InferResponse,
          "content": {"application/octet-stream": {"schema": {"type": "string",
                                                              "format": "binary"}}},
          "description": "Probabilities: JSON, or a JSON header and raw FP32 (binary extension)"},
    **errors(400, 401, 404, 413, 429),
}


# Registered first and without typed parameters: the hot path skips FastAPI's route scan and
# parameter validation (the model name is checked by _model).
@router.post("/models/{name}/infer", summary="Probabilities for a batch of tiles",
             openapi_extra={"requestBody": INFER_BODY, "parameters": [NAME_PARAM]},
             response_class=Response, responses=INFER_RESPONSES)
@router.post("/models/{name}/versions/{version}/infer", include_in_schema=False)
async def infer(request: Request) -> Response:
    svc = service(request)
    _model(svc, request.path_params["name"], request.path_params.get("version"))
    if request.headers.get("content-encoding", "identity") != "identity":
        raise HttpError(400, f"Content-Encoding {request.headers['content-encoding']!r} is not "
                             "supported; send the body uncompressed")
    tile_px, max_tiles = svc.engine.tile_px, svc.settings.max_tiles_per_request
    limit = max_tiles * tile_px * tile_px * 3 * JSON_BYTES_PER_VALUE + 65536
    body = await read_limited(request.stream(), limit, "infer request body")
    header_length = request.headers.get(HEADER_LENGTH)
    try:
        json_bytes = int(header_length) if header_length and header_length.isdigit() else len(body)
        if json_bytes > LOOP_PARSE_BYTES:  # parsing a big JSON body would hold up the loop
            req = await asyncio.get_running_loop().run_in_executor(
                svc.decoder, decode_request, body, header_length, tile_px, max_tiles)
        else:
            req = decode_request(body, header_length, tile_px, max_tiles)
    except BadRequest as exc:
        svc.metrics.inference_requests.labels(outcome="failure").inc()
        raise HttpError(400, str(exc)) from None
    try:
        future = svc.batcher.submit(req.tiles)
    except Overloaded as exc:
        svc.metrics.inference_requests.labels(outcome="failure").inc()
        raise HttpError(429, f"server busy ({exc}); retry later", {"Retry-After": "1"}) from None
    try:
        probs = await asyncio.wrap_future(future)
    except Exception:
        svc.metrics.inference_requests.labels(outcome="failure").inc()
        raise
    svc.metrics.inference_requests.labels(outcome="success").inc()
    payload, headers = encode_response(svc.settings.model_name, MODEL_VERSION, req.id, probs,
                                       req.binary_output)
    return Response(payload, headers=headers)


# The two health checks are answered by the app's outermost middleware (histocsc.serve.app),
# before routing; these routes describe them in the OpenAPI schema.
@router.get("/health/live", summary="Server is live", response_model=Live)
def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", response_model=Ready, responses={503: {"model": Ready}},
            summary="Server is ready: model loaded, batcher and slide-job worker running, "
                    "data folder writable")
def ready(request: Request, response: Response) -> dict[str, Any]:
    reasons = service(request).not_ready()
    if reasons:
        response.status_code = 503
    return {"ready": not reasons, "reasons": reasons}


@router.get("", summary="Server metadata", response_model=ServerMetadata, responses=errors(401))
def server_metadata() -> dict[str, Any]:
    return {"name": "histocsc", "version": __version__, "extensions": ["binary_tensor_data"]}


def _model(svc: Service, name: str, version: str | None = None) -> None:
    if name != svc.settings.model_name:
        raise HttpError(404, f"unknown model {name!r}; this server has "
                             f"{svc.settings.model_name!r}")
    if version not in (None, "", MODEL_VERSION):
        raise HttpError(404, f"model {name!r} has no version {version!r}; it has "
                             f"{MODEL_VERSION!r}")


def model_metadata(svc: Service) -> dict[str, Any]:
    """Inputs, outputs and the model's histocsc metadata as parameters."""
    e = svc.engine
    return {
        "name": svc.settings.model_name,
        "versions": [MODEL_VERSION],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": INPUT, "datatype": "UINT8", "shape": [-1, e.tile_px, e.tile_px, 3]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(e.markers)]}],
        "parameters": {
            "markers": ",".join(e.markers),
            "mpp": e.mpp,
            "tile_px": e.tile_px,
            "thresholds": json.dumps(e.meta["thresholds"]),
            "checksum": e.checksum,
            "precision": e.meta["precision"],
            "max_batch_size": svc.settings.max_batch,
            "max_tiles_per_request": svc.settings.max_tiles_per_request,
        },
    }


@router.get("/models/{name}", summary="Model metadata", response_model=ModelMetadata,
            responses=errors(401, 404))
@router.get("/models/{name}/versions/{version}", summary="Model metadata (one version)",
            response_model=ModelMetadata, responses=errors(401, 404))
def metadata(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    svc = service(request)
    _model(svc, name, version)
    return model_metadata(svc)


@router.get("/models/{name}/ready", summary="Model is ready", response_model=ModelReady,
            responses={503: {"model": ModelReady}, **errors(401, 404)})
@router.get("/models/{name}/versions/{version}/ready", summary="Model is ready (one version)",
            response_model=ModelReady, responses={503: {"model": ModelReady}, **errors(401, 404)})
def model_ready(request: Request, response: Response, name: str,
                version: str | None = None) -> dict[str, Any]:
    svc = service(request)
    _model(svc, name, version)
    ok = svc.ready and svc.batcher.running
    if not ok:
        response.status_code = 503
    return {"name": name, "ready": ok}
