"""Check that an ONNX model's graph agrees with its metadata, and that its outputs are
probabilities: a model that silently disagrees would give wrong heatmaps with exit 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from histocsc.errors import ModelError
from histocsc.learn.metadata import INPUT, OUTPUT


def check_graph(session: Any, path: Path, markers: list[str], tile_px: int) -> None:
    """At load: one uint8 input 'tiles' (N, tile_px, tile_px, 3) and an output 'probabilities'
    (N, len(markers)), where the graph fixes these sizes."""
    inputs = session.get_inputs()
    if [i.name for i in inputs] != [INPUT]:
        names = [i.name for i in inputs]
        raise ModelError(f"{path}: expected one input named {INPUT!r}, got {names}")
    shape = list(inputs[0].shape)
    if len(shape) != 4 or (isinstance(shape[3], int) and shape[3] != 3):
        raise ModelError(f"{path}: input {INPUT!r} must be (N, H, W, 3), the graph declares "
                         f"{shape}")
    declared = [d for d in shape[1:3] if isinstance(d, int)]
    if any(d != tile_px for d in declared):
        raise ModelError(f"{path}: the metadata says tile_px {tile_px} but the graph takes tiles "
                         f"of {shape[1]} x {shape[2]} px")
    outputs = {o.name: o for o in session.get_outputs()}
    if OUTPUT not in outputs:
        raise ModelError(f"{path}: no output named {OUTPUT!r} (outputs: {list(outputs)})")
    out_shape = list(outputs[OUTPUT].shape)
    width = out_shape[-1] if out_shape else None
    if len(out_shape) != 2 or isinstance(width, int) and width != len(markers):
        raise ModelError(f"{path}: the graph gives outputs of shape {out_shape} but the metadata "
                         f"names {len(markers)} marker(s) ({', '.join(markers)})")


def check_batch(probs: np.ndarray, path: Path, markers: list[str]) -> None:
    """On every batch: (N, len(markers)) finite values within [0, 1]."""
    if probs.ndim != 2 or probs.shape[1] != len(markers):
        raise ModelError(f"{path}: the model gave outputs of shape {probs.shape} but the metadata "
                         f"names {len(markers)} marker(s) ({', '.join(markers)})")
    if probs.size and not (np.isfinite(probs).all() and probs.min() >= 0 and probs.max() <= 1):
        raise ModelError(f"{path}: the model's outputs are not probabilities (range "
                         f"{np.nanmin(probs):.3g} to {np.nanmax(probs):.3g}, expected 0 to 1)")
