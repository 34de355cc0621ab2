"""Open Inference Protocol (KServe v2 REST) tensors: decode an infer request, encode a reply.

Both the JSON form and Triton's binary-tensor extension are supported: with the header
`Inference-Header-Content-Length: L`, the first L bytes of the body are the JSON header and
the raw tensors follow, in input order, each sized by its `binary_data_size` parameter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from histocsc.learn.metadata import INPUT, OUTPUT  # noqa: F401 (re-exported)

HEADER_LENGTH = "inference-header-content-length"


class BadRequest(ValueError):
    """The request is malformed; the message says what is wrong (sent back with a 400)."""


@dataclass
class InferRequest:
    """A decoded infer request."""

    id: str | None
    tiles: np.ndarray
    binary_output: bool


def decode_request(body: bytes, header_length: str | None, tile_px: int,
                   max_tiles: int) -> InferRequest:
    """Tiles uint8 (N, tile_px, tile_px, 3) from a JSON or binary-extension request body."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequest(f"Inference-Header-Content-Length must be an integer, "
                             f"got {header_length!r}") from None
        if not 0 < n <= len(body):
            raise BadRequest(f"Inference-Header-Content-Length {n} does not fit a body of "
                             f"{len(body)} bytes")
        header, binary = body[:n], memoryview(body)[n:]
    else:
        header, binary = body, memoryview(b"")
    try:
        request = json.loads(header)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise BadRequest("request body is not valid JSON (nested too deeply)") from None
    if not isinstance(request, dict):
        raise BadRequest("request body must be a JSON object with 'inputs'")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(f"'inputs' must list exactly one tensor named {INPUT!r}")
    spec = inputs[0]
    if spec.get("name") != INPUT:
        raise BadRequest(f"unknown input {spec.get('name')!r}; this model takes {INPUT!r}")
    if spec.get("datatype") != "UINT8":
        raise BadRequest(f"input {INPUT!r} must have datatype UINT8, got {spec.get('datatype')!r}")
    shape = spec.get("shape")
    want = [tile_px, tile_px, 3]
    if (not isinstance(shape, list) or len(shape) != 4 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in shape)
            or shape[1:] != want):
        raise BadRequest(f"input {INPUT!r} must have shape [N, {tile_px}, {tile_px}, 3], "
                         f"got {shape!r}")
    if not 1 <= shape[0] <= max_tiles:
        raise BadRequest(f"a request holds 1 to {max_tiles} tiles, got {shape[0]}")
    count = int(np.prod(shape))
    params = _parameters(spec, f"input {INPUT!r}")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if size != count or len(binary) != count:
            raise BadRequest(f"binary tensor {INPUT!r} must hold {count} bytes for shape {shape}, "
                             f"got binary_data_size {size!r} and {len(binary)} bytes")
        tiles = np.frombuffer(binary, np.uint8).reshape(shape)
    else:
        if len(binary):
            raise BadRequest("binary data follows the header but no input has binary_data_size")
        tiles = _json_tiles(spec.get("data"), shape, count)
    return InferRequest(id=_request_id(request), tiles=tiles,
                        binary_output=_wants_binary(request))


def _json_tiles(data: Any, shape: list[int], count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise BadRequest(f"input {INPUT!r} needs 'data' (a list of {count} integers 0..255)")
    try:
        values = np.asarray(data)
    except ValueError:
        raise BadRequest(f"input {INPUT!r} 'data' is a ragged list") from None
    if values.size != count:
        raise BadRequest(f"input {INPUT!r} has {values.size} values, shape {shape} needs {count}")
    if values.dtype.kind not in "iu":
        raise BadRequest(f"input {INPUT!r} values must be integers 0..255, "
                         f"got {values.dtype.name} data")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise BadRequest(f"input {INPUT!r} values must be 0..255, got {values.min()} to "
                         f"{values.max()}")
    return values.astype(np.uint8).reshape(shape)


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """The `parameters` object of a request, an input or an output ({} when absent)."""
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequest(f"'parameters' of {where} must be an object, got "
                         f"{type(params).__name__}")
    return params


def _request_id(request: dict[str, Any]) -> str | None:
    rid = request.get("id")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest("'id' must be a string")
    return rid


def _wants_binary(request: dict[str, Any]) -> bool:
    """Binary output if the requested output asks for it, or the request-level parameter."""
    outputs = request.get("outputs")
    binary = bool(_parameters(request, "the request").get("binary_data_output", False))
    if outputs is None:
        return binary
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise BadRequest("'outputs' must be a list of objects")
    for o in outputs:
        if o.get("name") != OUTPUT:
            raise BadRequest(f"unknown output {o.get('name')!r}; this model gives {OUTPUT!r}")
        params = _parameters(o, f"output {OUTPUT!r}")
        if params.get("classification"):
            raise BadRequest("the classification extension is not supported")
        binary = bool(params.get("binary_data", binary))
    return binary


def encode_response(model: str, version: str, request_id: str | None, probs: np.ndarray,
                    binary: bool) -> tuple[bytes, dict[str, str]]:
    """The reply body and its extra headers."""
    probs = np.ascontiguousarray(probs, dtype="<f4")
    out: dict[str, Any] = {"name": OUTPUT, "datatype": "FP32", "shape": list(probs.shape)}
    reply: dict[str, Any] = {"model_name": model, "model_version": version}
    if request_id is not None:
        reply["id"] = request_id
    reply["outputs"] = [out]
    if not binary:
        out["data"] = probs.ravel().tolist()
        return json.dumps(reply).encode(), {"content-type": "application/json"}
    raw = probs.tobytes()
    out["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps(reply).encode()
    return header + raw, {"content-type": "application/octet-stream",
                          HEADER_LENGTH: str(len(header))}
