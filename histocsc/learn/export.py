"""ONNX export: uint8 RGB tiles in, per-marker probabilities out, with a parity check.

The exported graph holds the whole preprocessing (uint8 -> float, /255, mean/std normalisation,
NHWC -> NCHW) and the final sigmoid, so a deployment only has to feed raw tiles.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histocsc.errors import DataError, ModelError
from histocsc.io import atomic_path
from histocsc.learn.check_tiles import (  # noqa: F401 (re-exported)
    IMAGE_SUFFIXES,
    load_tiles,
    sample,
    synthetic_check_tiles,
)
from histocsc.learn.metadata import (
    EMBEDDINGS,
    INPUT,
    OUTPUT,
    encode,
    model_metadata,
    read_metadata,  # noqa: F401 (re-exported)
)
from histocsc.learn.tilenet import TileNet
from histocsc.learn.variant_gate import GateLimits, check_variant, unseen
from histocsc.learn.variants import (  # noqa: F401 (re-exported)
    convert_fp16,
    quantize_int8,
    save_model,
    set_props,
)

PARITY_TOL = 1e-4
EXTERNAL_DATA_BYTES = 1_800_000_000  # graphs above this keep their weights in <model>.data
log = logging.getLogger(__name__)


class TileModel(nn.Module):
    """`model` with preprocessing, calibration and sigmoid inside: uint8 (N, H, W, 3) -> float
    (N, markers) calibrated probabilities, sigmoid((logit - shift) / temperature) per marker
    (histocsc.learn.calibration; shift 0 and temperature 1 when the run has no calibration).
    With `embeddings` (an encoder + head model), also the encoder's (N, D) embeddings."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float],
                 shift: list[float] | None = None, temperature: list[float] | None = None,
                 embeddings: bool = False) -> None:
        super().__init__()
        self.model = model
        self.embeddings = embeddings
        if embeddings and not isinstance(model, TileNet):
            raise ModelError("--embeddings needs an encoder model (model.backbone: an encoder "
                             "preset or timm:<architecture>)")
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)
        self.register_buffer("shift", torch.tensor(shift or [0.0], dtype=torch.float32))
        self.register_buffer("temperature",
                             torch.tensor(temperature or [1.0], dtype=torch.float32))

    def forward(self, tiles: torch.Tensor) -> Any:
        x = tiles.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        x = (x - self.mean) / self.std
        if not self.embeddings:
            return torch.sigmoid((self.model(x) - self.shift) / self.temperature)
        z = self.model.embed(x)
        return torch.sigmoid((self.model.head(z) - self.shift) / self.temperature), z


def calibration_params(meta: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Per-marker (shift, temperature) of a trained model's metadata (0 and 1 when absent)."""
    cal = meta.get("calibration") or {}
    rows = [cal.get(m, {}) for m in meta["markers"]]
    return ([float(r.get("shift", 0.0)) for r in rows],
            [float(r.get("temperature", 1.0)) for r in rows])


@dataclass
class ExportResult:
    """Paths written and the parity figures measured."""

    fp32: Path
    max_abs_diff: float
    int8: Path | None = None
    int8_max_abs_diff: float | None = None
    fp16: Path | None = None
    fp16_max_abs_diff: float | None = None
    exporter: str = "dynamo"
    notes: list[str] = field(default_factory=list)
    gates: list[str] = field(default_factory=list)  # how each variant passed its gate


def export_onnx(
    model: nn.Module,
    meta: dict[str, Any],
    out: str | Path,
    int8: bool = False,
    calibration: str | Path | np.ndarray | None = None,
    fp16: bool = False,
    check_tiles: str | Path | np.ndarray | None = None,
    limits: GateLimits | None = None,
    labelled: tuple[np.ndarray, np.ndarray] | None = None,
    embeddings: bool = False,
    external_data: bool | None = None,
) -> ExportResult:
    """Export `model` (float NCHW normalised input, logits out) as a uint8-in ONNX graph.

    Writes fp32 to `out`; with `int8`, also `<stem>.int8.onnx` (static QDQ quantization
    calibrated on `calibration` tiles); with `fp16`, also `<stem>.fp16.onnx`. Raises ModelError if
    the fp32 graph differs from PyTorch by more than 1e-4 on `check_tiles` (default: the
    calibration tiles, else a fixed synthetic batch). Each variant must pass the gate of
    `histocsc.learn.variant_gate` (`limits`) on tiles not used for calibration: `labelled`
    (tiles, labels) when given, else `check_tiles`, else the half of the calibration tiles
    held back from calibrating; a failing variant is not written (ModelError).
    `embeddings`: a second output, the encoder's embeddings. `external_data` (default: when the
    weights pass 1.8 GB): the weights go to `<out>.data` beside the graph (ONNX external data).
    """
    out = Path(out)
    meta = {**meta, "outputs": [OUTPUT, EMBEDDINGS] if embeddings else [OUTPUT]}
    props = model_metadata(meta)
    tile_px = int(meta["tile_px"])
    wrapped = TileModel(model, list(meta.get("mean", [0, 0, 0])),
                        list(meta.get("std", [1, 1, 1])), *calibration_params(meta),
                        embeddings=embeddings).eval().cpu()
    if external_data is None:
        size = sum(t.numel() * t.element_size() for t in wrapped.state_dict().values())
        external_data = size > EXTERNAL_DATA_BYTES
    calib = load_tiles(calibration, tile_px, limit=256) if calibration is not None else None
    if check_tiles is not None:
        tiles = load_tiles(check_tiles, tile_px, limit=32)
    elif calib is not None:
        tiles = sample(calib, 32)
    else:
        tiles = synthetic_check_tiles(tile_px)
    with torch.no_grad():
        outputs = wrapped(torch.from_numpy(tiles))
    expected = (outputs[0] if embeddings else outputs).numpy()
    if expected.shape[1] != len(json.loads(props["markers"])):
        raise ModelError(f"model gives {expected.shape[1]} outputs for markers {props['markers']}")

    exporter = _export_graph(wrapped, tile_px, out, props, external_data)
    result = ExportResult(fp32=out, max_abs_diff=0.0, exporter=exporter)
    if exporter != "dynamo":
        result.notes.append("dynamo export failed; used the TorchScript exporter (dynamo=False)")
    if external_data:
        result.notes.append(f"weights in ONNX external data: {out.name}.data beside the graph; "
                            "keep both files together")
    result.max_abs_diff = _max_diff(out, tiles, expected)
    if embeddings:
        got = _run(out, tiles, EMBEDDINGS)
        result.max_abs_diff = max(result.max_abs_diff,
                                  float(np.max(np.abs(got - outputs[1].numpy()))))
    if not result.max_abs_diff <= PARITY_TOL:
        out.unlink(missing_ok=True)
        raise ModelError(f"{out}: ONNX fp32 differs from PyTorch by {result.max_abs_diff:.2e} "
                         f"(> {PARITY_TOL:g}) on {len(tiles)} check tiles; export removed")
    if int8 and calibration is None:
        raise DataError("int8 export needs calibration tiles (a folder of images or tiles.npy)")
    if not (int8 or fp16):
        return result
    if calib is not None and check_tiles is None:  # hold half back from calibration
        calib, held = calib[0::2], calib[1::2]
    else:
        held = tiles
    gate_tiles, gate_labels = labelled if labelled is not None else (held, None)
    fresh = unseen(gate_tiles, calib if int8 else None)
    gate_tiles = gate_tiles[fresh]
    gate_labels = gate_labels[fresh] if gate_labels is not None else None
    if not len(gate_tiles):
        gate_tiles, gate_labels = synthetic_check_tiles(tile_px, 16, seed=1), None
    reference = _run(out, gate_tiles)
    markers = list(json.loads(props["markers"]))
    gate = limits or GateLimits()
    if int8:
        result.int8 = out.with_name(out.stem + ".int8.onnx")
        result.gates.append(_int8_through_gate(out, result.int8, calib, gate_tiles, gate_labels,
                                               reference, markers, gate, external_data))
        result.int8_max_abs_diff = _max_diff(result.int8, tiles, expected)
    if fp16:
        result.fp16 = out.with_name(out.stem + ".fp16.onnx")
        convert_fp16(out, result.fp16, external_data)
        result.fp16_max_abs_diff = _max_diff(result.fp16, tiles, expected)
        result.gates.append(check_variant(result.fp16, "fp16", reference,
                                          _run(result.fp16, gate_tiles), gate_labels, markers,
                                          gate))
    return result


def _int8_through_gate(out: Path, dst: Path, calib: Any, gate_tiles: np.ndarray,
                       gate_labels: np.ndarray | None, reference: np.ndarray,
                       markers: list[str], gate: GateLimits, external: bool) -> str:
    """Naive int8 first; if that fails the gate on a transformer graph, again with LayerNorm,
    Softmax and GELU kept in float (ViTs lose accuracy there under int8)."""
    quantize_int8(out, dst, calib, external=external)
    try:
        return check_variant(dst, "int8", reference, _run(dst, gate_tiles), gate_labels,
                             markers, gate)
    except ModelError as naive:
        if not _is_transformer(out):
            raise
        quantize_int8(out, dst, calib, external=external, keep_transformer_float=True)
        line = check_variant(dst, "int8 (LayerNorm/Softmax/GELU in float)", reference,
                             _run(dst, gate_tiles), gate_labels, markers, gate)
        return f"{line}; naive int8 failed the gate: {naive}"


def _is_transformer(path: Path) -> bool:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return any(n.op_type in ("Softmax", "LayerNormalization") for n in proto.graph.node)


def _export_graph(wrapped: TileModel, tile_px: int, out: Path, props: dict[str, str],
                  external: bool = False) -> str:
    """torch.onnx.export with dynamo (falls back to TorchScript); returns the exporter used."""
    import onnx

    example = torch.zeros(2, tile_px, tile_px, 3, dtype=torch.uint8)
    names = [OUTPUT, EMBEDDINGS] if wrapped.embeddings else [OUTPUT]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        exporter = "dynamo"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _quiet_onnx_logs()
                program = torch.onnx.export(
                    wrapped, (example,), dynamo=True, external_data=False, optimize=True,
                    input_names=[INPUT], output_names=names,
                    dynamic_shapes={INPUT: {0: torch.export.Dim("batch", min=1)}},
                    verbose=False,
                )
                proto = program.model_proto
        except Exception as exc:  # any exporter failure: retry with the TorchScript exporter
            log.warning("dynamo export failed (%s); falling back to dynamo=False", exc)
            exporter = "torchscript"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapped, (example,), str(tmp), dynamo=False, opset_version=17,
                    input_names=[INPUT], output_names=names,
                    dynamic_axes={n: {0: "batch"} for n in [INPUT, *names]},
                )
            proto = onnx.load(str(tmp))
        set_props(proto, {**props, **encode(precision="fp32", exporter=exporter)})
        save_model(proto, tmp, out.name, external)
    return exporter


def _quiet_onnx_logs() -> None:
    for name in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _run(path: Path, tiles: np.ndarray, output: str = OUTPUT) -> np.ndarray:
    """The graph's `output` on `tiles`, on the CPU, 8 tiles a batch."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run([output], {INPUT: tiles[i:i + 8]})[0]
                           for i in range(0, len(tiles), 8)])


def _max_diff(path: Path, tiles: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(_run(path, tiles).astype(np.float64) - expected)))
