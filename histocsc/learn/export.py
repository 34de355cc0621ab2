"""ONNX export: uint8 RGB tiles in, per-marker probabilities out, with a parity check.

The exported graph holds the whole preprocessing (uint8 -> float, /255, mean/std normalisation,
NHWC -> NCHW) and the final sigmoid, so a deployment only has to feed raw tiles.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histocsc.errors import DataError, ModelError
from histocsc.io import atomic_path
from histocsc.learn.metadata import (
    INPUT,
    OUTPUT,
    encode,
    model_metadata,
    read_metadata,  # noqa: F401 (re-exported)
)
from histocsc.learn.variant_gate import GateLimits, check_variant, unseen

PARITY_TOL = 1e-4
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
log = logging.getLogger(__name__)


class TileModel(nn.Module):
    """`model` with preprocessing, calibration and sigmoid inside: uint8 (N, H, W, 3) -> float
    (N, markers) calibrated probabilities, sigmoid((logit - shift) / temperature) per marker
    (histocsc.learn.calibration; shift 0 and temperature 1 when the run has no calibration)."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float],
                 shift: list[float] | None = None, temperature: list[float] | None = None) -> None:
        super().__init__()
        self.model = model
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)
        self.register_buffer("shift", torch.tensor(shift or [0.0], dtype=torch.float32))
        self.register_buffer("temperature",
                             torch.tensor(temperature or [1.0], dtype=torch.float32))

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        x = tiles.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        x = (x - self.mean) / self.std
        return torch.sigmoid((self.model(x) - self.shift) / self.temperature)


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


def load_tiles(source: str | Path | np.ndarray, tile_px: int, limit: int = 256) -> np.ndarray:
    """Tiles (N, tile_px, tile_px, 3) uint8 from an array, a `tiles.npy` or a folder of images.

    Images larger than a tile give their centre crop; smaller ones are resized up.
    """
    if isinstance(source, np.ndarray):
        arr = source
    else:
        path = Path(source)
        if path.is_file() and path.suffix == ".npy":
            arr = np.load(path, mmap_mode="r")
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            npys = sorted(path.rglob("tiles.npy"))
            if files:
                arr = np.stack([_image_tile(p, tile_px) for p in _sample_list(files, limit)])
            elif npys:
                arr = np.concatenate([_fit_all(_sample(np.load(p, mmap_mode="r"), limit),
                                               tile_px, p) for p in npys])
            else:
                raise DataError(f"{path}: no images (.png/.jpg/.tif) or tiles.npy found")
        else:
            raise DataError(f"{path}: calibration/check tiles must be a folder or a .npy file")
    return np.ascontiguousarray(_fit_all(_sample(arr, limit), tile_px, source))


def _fit_all(arr: np.ndarray, tile_px: int, source: object) -> np.ndarray:
    """Check uint8 (N, H, W, 3) and bring every tile to tile_px."""
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        where = "" if isinstance(source, np.ndarray) else f"{source}: "
        raise DataError(f"{where}tiles must be uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}")
    if arr.shape[1:3] != (tile_px, tile_px):
        arr = np.stack([_fit(t, tile_px) for t in arr])
    return arr


def _sample_list(items: list[Path], limit: int) -> list[Path]:
    """At most `limit` items spread evenly over the list."""
    if len(items) <= limit:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def _sample(arr: np.ndarray, limit: int) -> np.ndarray:
    if len(arr) <= limit:
        return np.asarray(arr)
    idx = np.linspace(0, len(arr) - 1, limit).round().astype(int)
    return np.asarray(arr[idx])


def _image_tile(path: Path, tile_px: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgba = im.convert("RGBA")
    except Exception as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from exc
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return _fit(np.asarray(Image.alpha_composite(white, rgba).convert("RGB")), tile_px)


def _fit(img: np.ndarray, tile_px: int) -> np.ndarray:
    """Centre crop to a square tile, resizing only when the image is smaller than a tile."""
    import cv2

    h, w = img.shape[:2]
    if min(h, w) < tile_px:
        scale = tile_px / min(h, w)
        img = cv2.resize(img, (max(tile_px, round(w * scale)), max(tile_px, round(h * scale))),
                         interpolation=cv2.INTER_LINEAR)
        h, w = img.shape[:2]
    y0, x0 = (h - tile_px) // 2, (w - tile_px) // 2
    return np.ascontiguousarray(img[y0:y0 + tile_px, x0:x0 + tile_px, :3])


def synthetic_check_tiles(tile_px: int, n: int = 8, seed: int = 0) -> np.ndarray:
    """A fixed batch of textured tiles, used for parity when no real tiles are given."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, tile_px // 8 + 1, tile_px // 8 + 1, 3), dtype=np.uint8)
    smooth = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)[:, :tile_px, :tile_px]
    noise = rng.integers(-20, 21, size=smooth.shape)
    return np.clip(smooth.astype(int) + noise, 0, 255).astype(np.uint8)


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
) -> ExportResult:
    """Export `model` (float NCHW normalised input, logits out) as a uint8-in ONNX graph.

    Writes fp32 to `out`; with `int8`, also `<stem>.int8.onnx` (static QDQ quantization
    calibrated on `calibration` tiles); with `fp16`, also `<stem>.fp16.onnx`. Raises ModelError if
    the fp32 graph differs from PyTorch by more than 1e-4 on `check_tiles` (default: the
    calibration tiles, else a fixed synthetic batch). Each variant must pass the gate of
    `histocsc.learn.variant_gate` (`limits`) on tiles not used for calibration: `labelled`
    (tiles, labels) when given, else `check_tiles`, else the half of the calibration tiles
    held back from calibrating; a failing variant is not written (ModelError).
    """
    out = Path(out)
    props = model_metadata(meta)
    tile_px = int(meta["tile_px"])
    wrapped = TileModel(model, list(meta.get("mean", [0, 0, 0])),
                        list(meta.get("std", [1, 1, 1])), *calibration_params(meta)).eval().cpu()
    calib = load_tiles(calibration, tile_px, limit=256) if calibration is not None else None
    if check_tiles is not None:
        tiles = load_tiles(check_tiles, tile_px, limit=32)
    elif calib is not None:
        tiles = _sample(calib, 32)
    else:
        tiles = synthetic_check_tiles(tile_px)
    with torch.no_grad():
        expected = wrapped(torch.from_numpy(tiles)).numpy()
    if expected.shape[1] != len(json.loads(props["markers"])):
        raise ModelError(f"model gives {expected.shape[1]} outputs for markers {props['markers']}")

    exporter = _export_graph(wrapped, tile_px, out, props)
    result = ExportResult(fp32=out, max_abs_diff=0.0, exporter=exporter)
    if exporter != "dynamo":
        result.notes.append("dynamo export failed; used the TorchScript exporter (dynamo=False)")
    result.max_abs_diff = _max_diff(out, tiles, expected)
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
        quantize_int8(out, result.int8, calib)
        result.gates.append(check_variant(result.int8, "int8", reference,
                                          _run(result.int8, gate_tiles), gate_labels, markers,
                                          gate))
        result.int8_max_abs_diff = _max_diff(result.int8, tiles, expected)
    if fp16:
        result.fp16 = out.with_name(out.stem + ".fp16.onnx")
        convert_fp16(out, result.fp16)
        result.fp16_max_abs_diff = _max_diff(result.fp16, tiles, expected)
        result.gates.append(check_variant(result.fp16, "fp16", reference,
                                          _run(result.fp16, gate_tiles), gate_labels, markers,
                                          gate))
    return result


def _export_graph(wrapped: nn.Module, tile_px: int, out: Path, props: dict[str, str]) -> str:
    """torch.onnx.export with dynamo (falls back to TorchScript); returns the exporter used."""
    import onnx

    example = torch.zeros(2, tile_px, tile_px, 3, dtype=torch.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        exporter = "dynamo"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _quiet_onnx_logs()
                program = torch.onnx.export(
                    wrapped, (example,), dynamo=True, external_data=False, optimize=True,
                    input_names=[INPUT], output_names=[OUTPUT],
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
                    input_names=[INPUT], output_names=[OUTPUT],
                    dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                )
            proto = onnx.load(str(tmp))
        _set_props(proto, {**props, **encode(precision="fp32", exporter=exporter)})
        onnx.save(proto, str(tmp))
    return exporter


def _quiet_onnx_logs() -> None:
    for name in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _set_props(proto: Any, props: dict[str, str]) -> None:
    import onnx

    old = {p.key: p.value for p in proto.metadata_props}
    old.update(props)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, old)


def _run(path: Path, tiles: np.ndarray) -> np.ndarray:
    """The graph's outputs on `tiles`, on the CPU, 8 tiles a batch."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run([OUTPUT], {INPUT: tiles[i:i + 8]})[0]
                           for i in range(0, len(tiles), 8)])


def _max_diff(path: Path, tiles: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(_run(path, tiles).astype(np.float64) - expected)))


class _Calibration:
    """onnxruntime CalibrationDataReader over a tile array, in small batches."""

    def __init__(self, tiles: np.ndarray, batch: int = 16) -> None:
        self._iter: Iterator[dict[str, np.ndarray]] = (
            {INPUT: tiles[i:i + batch]} for i in range(0, len(tiles), batch))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)


def quantize_int8(src: Path, dst: Path, calib: np.ndarray) -> None:
    """Static QDQ int8 quantization (per-channel weights, uint8 activations) of `src`."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with atomic_path(dst) as tmp, tempfile.TemporaryDirectory(dir=dst.parent) as work:
        pre = Path(work) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        proto = onnx.load(str(pre))
        # keep the uint8 -> normalised float preprocessing and the final sigmoid in float
        keep_float = [n.name for n in proto.graph.node
                      if n.op_type in ("Cast", "Transpose", "Div", "Sub", "Sigmoid")
                      and not _after_first_conv(proto, n)]
        keep_float += [n.name for n in proto.graph.node if n.op_type == "Sigmoid"]
        quantize_static(
            str(pre), str(tmp), _Calibration(calib), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=keep_float,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        q = onnx.load(str(tmp))
        _set_props(q, encode(precision="int8"))
        onnx.save(q, str(tmp))


def _after_first_conv(proto: Any, node: Any) -> bool:
    """True if `node` comes after the first Conv/Gemm/MatMul in topological order."""
    for n in proto.graph.node:
        if n is node:
            return False
        if n.op_type in ("Conv", "Gemm", "MatMul"):
            return True
    return False


def convert_fp16(src: Path, dst: Path) -> None:
    """Float16 weights and compute, keeping the uint8 input and float32 output."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = onnx.load(str(src))
    half = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=False)
    _set_props(half, encode(precision="fp16"))
    with atomic_path(dst) as tmp:
        onnx.save(half, str(tmp))
