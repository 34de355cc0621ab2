"""Encoders on this machine, one run: ViT-S/16, ViT-B/16, ViT-L/16 at 224 px (random weights).

Per encoder: feature extraction tiles/s in PyTorch, onnxruntime fp32 and onnxruntime int8 (with
the gate's verdict), head training seconds per epoch on cached features, export size. Figures
are printed beside ratios to the PyTorch rate of the same encoder in the same run, and the load.

    python scripts/bench_encoders.py [--models vit_small_patch16_224,vit_base_patch16_224]
        [--tiles 32] [--batch 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from histocsc.learn.export import TileModel, export_onnx, synthetic_check_tiles
from histocsc.learn.model import build_model
from histocsc.learn.variant_gate import GateLimits

MODELS = "vit_small_patch16_224,vit_base_patch16_224,vit_large_patch16_224"
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def rate(fn, tiles: np.ndarray, batch: int) -> float:
    fn(tiles[:batch])  # warm-up
    t = time.perf_counter()
    for i in range(0, len(tiles), batch):
        fn(tiles[i:i + batch])
    return len(tiles) / (time.perf_counter() - t)


def ort_fn(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(["probabilities"], {"tiles": x})


def head_epoch_s(dim: int, n: int = 5000) -> float:
    """Seconds for one epoch of the MLP head over n cached features (batch 64, AdamW)."""
    from histocsc.learn.tilenet import Head

    head = Head(dim, 2, "mlp")
    opt = torch.optim.AdamW(head.parameters(), 1e-3)
    x, y = torch.randn(n, dim), torch.randint(0, 2, (n, 2)).float()
    t = time.perf_counter()
    for i in range(0, n, 64):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(x[i:i + 64]), y[i:i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--tiles", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-int8", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("load before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    tiles = synthetic_check_tiles(224, args.tiles, seed=3)
    calib = synthetic_check_tiles(224, 32, seed=4)
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = build_model(f"timm:{name}", 2).eval()
        wrapped = TileModel(model, MEAN, STD)
        with torch.inference_mode():
            pt = rate(lambda x, w=wrapped: w(torch.from_numpy(x)), tiles, args.batch)
        meta = {"markers": ["A", "B"], "tile_px": 224, "mpp": 0.5, "mean": MEAN, "std": STD,
                "backbone": f"timm:{name}"}
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "m.onnx"
            t = time.perf_counter()
            res = export_onnx(model, meta, out, int8=not args.no_int8, calibration=calib,
                              check_tiles=tiles[:4], limits=GateLimits(max_prob_diff=0.05))
            export_s = time.perf_counter() - t
            size = sum(p.stat().st_size for p in Path(tmp).glob("m.onnx*"))
            fp32 = rate(ort_fn(out, args.threads), tiles, args.batch)
            line = (f"{name}: PyTorch {pt:.1f} tiles/s; ORT fp32 {fp32:.1f} tiles/s "
                    f"({fp32 / pt:.2f}x PyTorch, parity {res.max_abs_diff:.1e}); ")
            if res.int8:
                i8 = rate(ort_fn(res.int8, args.threads), tiles, args.batch)
                line += (f"ORT int8 {i8:.1f} tiles/s ({i8 / pt:.2f}x), gate: {res.gates[0]}; "
                         f"int8 size {res.int8.stat().st_size / 1e6:.0f} MB; ")
            line += (f"fp32 export {size / 1e6:.0f} MB in {export_s:.0f} s; head (MLP) epoch "
                     f"over 5000 cached features {head_epoch_s(model.encoder.dim):.2f} s")
        print(line, flush=True)
    print("load after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(f"cpus: {os.cpu_count()}, threads {args.threads}, {args.tiles} tiles, batch {args.batch}")


if __name__ == "__main__":
    main()
