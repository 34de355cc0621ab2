"""Benchmark `histocsc serve`: tiles/s through /v2/models/{name}/infer against the engine alone.

    python scripts/bench_service.py [--backbone tiny|resnet18] [--tiles-per-request 4]

In one run: a model of the chosen backbone (random weights; speed does not depend on them) is
exported by the project's own export; (1) the engine alone (`Engine.predict`, the code of
`histocsc infer`) on in-memory tiles in batches of --max-batch; (2) a `histocsc serve` process
with dynamic batching, driven by 1, 8 and 32 concurrent clients (threads with keep-alive
connections, binary tensor extension) for --seconds each: tiles/s, p50 / p99 latency and the
mean batch size (Δ inference count / Δ execution count from /metrics); (3) the server's RSS
after 1,000 and after 10,000 requests (a leak shows as growth). The clients run on the same
machine as the server, so they take CPU from it: the ratio is a lower bound.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
REAL_TILES = ROOT.parent / "shared" / "data" / "real" / "he-tiles"
MARKERS = ["CD133", "CD44"]


def export_model(backbone: str, tile_px: int, folder: Path) -> Path:
    import torch

    from histocsc.learn.export import export_onnx
    from histocsc.learn.model import build_model

    torch.manual_seed(0)
    model = build_model(backbone, len(MARKERS)).eval()
    meta = {"markers": MARKERS, "tile_px": tile_px, "mpp": 0.5, "backbone": backbone,
            "mean": [0.8, 0.6, 0.75], "std": [0.1, 0.15, 0.1]}
    out = folder / f"{backbone}.onnx"
    export_onnx(model, meta, out)
    return out


def bench_tiles(tile_px: int, n: int = 256) -> np.ndarray:
    from histocsc.learn.export import load_tiles, synthetic_check_tiles

    if REAL_TILES.is_dir():
        base = load_tiles(REAL_TILES, tile_px, limit=n)
    else:
        base = synthetic_check_tiles(tile_px, n=n)
    reps = -(-n // len(base))
    return np.ascontiguousarray(np.concatenate([base] * reps)[:n])


def engine_rate(model: Path, tiles: np.ndarray, batch: int, seconds: float) -> float:
    from histocsc.predict.engine import Engine

    engine = Engine(model, device="cpu")
    engine.predict(tiles[:batch])
    n, i, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        chunk = tiles[i:i + batch] if i + batch <= len(tiles) else tiles[:batch]
        i = (i + batch) % len(tiles)
        engine.predict(chunk)
        n += len(chunk)
    return n / (time.perf_counter() - start)


class Client:
    """One keep-alive connection sending binary-extension infer requests."""

    def __init__(self, port: int, model: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        self.path = f"/v2/models/{model}/infer"

    def infer(self, tiles: np.ndarray) -> np.ndarray:
        header = json.dumps({
            "inputs": [{"name": "tiles", "datatype": "UINT8", "shape": list(tiles.shape),
                        "parameters": {"binary_data_size": tiles.nbytes}}],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }).encode()
        self.conn.request("POST", self.path, header + tiles.tobytes(), {
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream"})
        res = self.conn.getresponse()
        body = res.read()
        if res.status != 200:
            raise RuntimeError(f"{res.status}: {body[:200]!r}")
        n = int(res.getheader("Inference-Header-Content-Length"))
        return np.frombuffer(body[n:], "<f4").reshape(len(tiles), -1)


def load(port: int, model: str, tiles: np.ndarray, per_request: int, clients: int,
         seconds: float | None = None, requests: int | None = None) -> list[float]:
    """Latencies (s) of requests sent by `clients` threads for `seconds` or `requests` total."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    sent = [0]
    stop_at = time.perf_counter() + seconds if seconds else None

    def worker(k: int) -> None:
        client = Client(port, model)
        i = k * per_request
        while True:
            with lock:
                if requests is not None and sent[0] >= requests:
                    return
                sent[0] += 1
            if stop_at is not None and time.perf_counter() > stop_at:
                return
            start = i % (len(tiles) - per_request)
            t0 = time.perf_counter()
            try:
                client.infer(tiles[start:start + per_request])
            except Exception as exc:  # noqa: BLE001 - counted, reported
                errors.append(repr(exc))
                return
            with lock:
                latencies.append(time.perf_counter() - t0)
            i += clients * per_request

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} client errors, first: {errors[0]}")
    return latencies


def counters(port: int) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(("histocsc_inference_count_total",
                            "histocsc_inference_exec_count_total")):
            name, value = line.split(" ")
            out[name] = float(value)
    return out


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    from serve_helpers import running_server

    from histocsc.predict.engine import Engine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="tiny", choices=["tiny", "resnet18"])
    ap.add_argument("--tile-px", type=int, default=None, help="default: 64 tiny, 224 resnet18")
    ap.add_argument("--tiles-per-request", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    ap.add_argument("--seconds", type=float, default=8.0, help="per concurrency level")
    ap.add_argument("--rss-requests", type=int, default=10_000, help="0 to skip the RSS check")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    tile_px = args.tile_px or (224 if args.backbone == "resnet18" else 64)
    report: dict[str, object] = {"backbone": args.backbone, "tile_px": tile_px,
                                 "tiles_per_request": args.tiles_per_request,
                                 "max_batch": args.max_batch,
                                 "max_queue_delay_ms": args.max_queue_delay_ms}
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        work = Path(tmp)
        model = export_model(args.backbone, tile_px, work)
        tiles = bench_tiles(tile_px)
        base = engine_rate(model, tiles, args.max_batch, args.seconds)
        report["engine_tiles_per_s"] = base
        print(f"{args.backbone} {tile_px} px; engine alone, batch {args.max_batch}: "
              f"{base:.0f} tiles/s")
        want = Engine(model, device="cpu").predict(tiles[:8])
        with running_server(model, work / "data", "--max-batch", str(args.max_batch),
                            "--max-queue-delay-ms", str(args.max_queue_delay_ms),
                            "--max-tiles-per-request", str(max(64, args.tiles_per_request))
                            ) as srv:
            port = int(srv.url.rsplit(":", 1)[1])
            got = Client(port, "histocsc").infer(tiles[:8])
            assert np.abs(got - want).max() <= 1e-6, "service and engine disagree"
            levels = {}
            for clients in (1, 8, 32):
                load(port, "histocsc", tiles, args.tiles_per_request, clients, requests=clients)
                before, t0 = counters(port), time.perf_counter()
                lat = load(port, "histocsc", tiles, args.tiles_per_request, clients,
                           seconds=args.seconds)
                wall = time.perf_counter() - t0
                after = counters(port)
                batches = (after["histocsc_inference_exec_count_total"]
                           - before["histocsc_inference_exec_count_total"])
                inferred = (after["histocsc_inference_count_total"]
                            - before["histocsc_inference_count_total"])
                rate = len(lat) * args.tiles_per_request / wall
                levels[clients] = {
                    "tiles_per_s": rate, "ratio_to_engine": rate / base,
                    "p50_ms": 1000 * float(np.percentile(lat, 50)),
                    "p99_ms": 1000 * float(np.percentile(lat, 99)),
                    "mean_batch": inferred / batches if batches else float("nan"),
                    "requests": len(lat)}
                row = levels[clients]
                print(f"concurrency {clients:2d}: {rate:7.0f} tiles/s ({rate / base:.2f}x "
                      f"engine), p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, "
                      f"mean batch {row['mean_batch']:.1f} tiles, {len(lat)} requests")
            report["concurrency"] = levels
            if args.rss_requests:
                load(port, "histocsc", tiles, 1, 8, requests=1000)
                first = rss_mib(srv.proc.pid)
                load(port, "histocsc", tiles, 1, 8, requests=args.rss_requests - 1000)
                last = rss_mib(srv.proc.pid)
                report["rss_mib"] = {"after_1000": first, f"after_{args.rss_requests}": last,
                                     "growth": last / first - 1}
                print(f"server RSS: {first:.1f} MiB after 1,000 requests, {last:.1f} MiB after "
                      f"{args.rss_requests:,} ({100 * (last / first - 1):+.1f} %; target "
                      "within 10 %)")
    ratio = levels[32]["ratio_to_engine"]
    print(f"concurrency 32 / engine alone: {ratio:.2f}x (target >= 0.8)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
