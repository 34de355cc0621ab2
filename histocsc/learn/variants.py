"""The int8 and fp16 variants of an exported fp32 graph (each then goes through the gate of
histocsc.learn.variant_gate)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from histocsc.io import atomic_path
from histocsc.learn.metadata import INPUT, encode


def set_props(proto: Any, props: dict[str, str]) -> None:
    import onnx

    old = {p.key: p.value for p in proto.metadata_props}
    old.update(props)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, old)


def save_model(proto: Any, tmp: Path, final_name: str, external: bool) -> None:
    """onnx.save; with `external`, the weights into `<final_name>.data` beside it (the graph
    names that file, so it carries the final name; the graph itself is renamed last)."""
    import onnx

    if external:
        onnx.save(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=final_name + ".data", size_threshold=1024)
    else:
        onnx.save(proto, str(tmp))


class _Calibration:
    """onnxruntime CalibrationDataReader over a tile array, in small batches."""

    def __init__(self, tiles: np.ndarray, batch: int = 16) -> None:
        self._iter: Iterator[dict[str, np.ndarray]] = (
            {INPUT: tiles[i:i + batch]} for i in range(0, len(tiles), batch))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)


def quantize_int8(src: Path, dst: Path, calib: np.ndarray, external: bool = False,
                  keep_transformer_float: bool = False) -> None:
    """Static QDQ int8 quantization (per-channel weights, uint8 activations) of `src`.

    `keep_transformer_float`: quantize only Conv / MatMul / Gemm, leaving LayerNorm, Softmax,
    GELU and the rest in float (naive int8 of those costs ViTs their accuracy)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with atomic_path(dst) as tmp, tempfile.TemporaryDirectory(dir=dst.parent) as work:
        pre, done = Path(work) / "pre.onnx", Path(work) / "q.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True,
                          save_as_external_data=external)
        proto = onnx.load(str(pre), load_external_data=False)
        # keep the uint8 -> normalised float preprocessing and the final sigmoid in float
        keep_float = [n.name for n in proto.graph.node
                      if n.op_type in ("Cast", "Transpose", "Div", "Sub", "Sigmoid")
                      and not _after_first_conv(proto, n)]
        keep_float += [n.name for n in proto.graph.node if n.op_type == "Sigmoid"]
        quantize_static(
            str(pre), str(done), _Calibration(calib), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=keep_float,
            op_types_to_quantize=["Conv", "MatMul", "Gemm"] if keep_transformer_float else None,
            use_external_data_format=external,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        q = onnx.load(str(done))
        set_props(q, encode(precision="int8"))
        save_model(q, tmp, dst.name, external)


def _after_first_conv(proto: Any, node: Any) -> bool:
    """True if `node` comes after the first Conv/Gemm/MatMul in topological order."""
    for n in proto.graph.node:
        if n is node:
            return False
        if n.op_type in ("Conv", "Gemm", "MatMul"):
            return True
    return False


def convert_fp16(src: Path, dst: Path, external: bool = False) -> None:
    """Float16 weights and compute, keeping the uint8 input and float32 output."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = onnx.load(str(src))
    half = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=external)
    set_props(half, encode(precision="fp16"))
    with atomic_path(dst) as tmp:
        save_model(half, tmp, dst.name, external)
