"""Benchmark `histocsc serve`: tiles/s through /v2/models/{name}/infer against the engine alone.

    python scripts/bench_service.py [--backbone tiny|resnet18] [--tiles-per-request 4]
        [--before DIR] [--levels 1,8,32] [--slide-jobs N --slide SLIDE]

In one run: a model of the chosen backbone (random weights; speed does not depend on them) is
exported by the project's own export; (1) the engine alone (`Engine.predict`, the code of
`histocsc infer`) on in-memory tiles in batches of --max-batch; (2) a `histocsc serve` process
with dynamic batching, driven by 1, 8 and 32 concurrent clients (threads with keep-alive
connections, binary tensor extension) for --seconds each: tiles/s, p50 / p99 latency and the
mean batch size (Δ inference count / Δ execution count from /metrics); with `--before DIR` (a
checkout of older code, e.g. `git worktree add /tmp/before main`) the same levels also run
against a server of that code, in turns with this one, so before -> after comes from one run;
(3) the server's RSS after 1,000 and after 10,000 requests (a leak shows as growth); (4) with
--slide-jobs N, the RSS of the server and of its slide-job worker after the first and after N
slide jobs of SLIDE (or as many as --jobs-seconds allows), as growth per job. The clients run
on the same machine as the server, so they take CPU from it: the ratio is a lower bound.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from histocsc.predict.engine import Engine  # noqa: E402

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


def engine_rate(engine: Engine, tiles: np.ndarray, batch: int,
                seconds: float) -> tuple[float, float]:
    """Tiles/s and CPU seconds per tile of `Engine.predict` on in-memory tiles."""
    engine.predict(tiles[:batch])
    n, i, start, cpu = 0, 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        chunk = tiles[i:i + batch] if i + batch <= len(tiles) else tiles[:batch]
        i = (i + batch) % len(tiles)
        engine.predict(chunk)
        n += len(chunk)
    return n / (time.perf_counter() - start), (time.process_time() - cpu) / n


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def level(port: int, pid: int, tiles: np.ndarray, per_request: int, clients: int,
          seconds: float) -> dict[str, float]:
    """Tiles/s, p50 / p99 latency, mean batch size and server CPU seconds per tile at one
    concurrency."""
    load(port, "histocsc", tiles, per_request, clients, requests=clients)  # warm connections
    before, t0, cpu = counters(port), time.perf_counter(), cpu_seconds(pid)
    lat = load(port, "histocsc", tiles, per_request, clients, seconds=seconds)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu
    after = counters(port)
    batches = (after["histocsc_inference_exec_count_total"]
               - before["histocsc_inference_exec_count_total"])
    inferred = (after["histocsc_inference_count_total"]
                - before["histocsc_inference_count_total"])
    return {"tiles_per_s": len(lat) * per_request / wall,
            "p50_ms": 1000 * float(np.percentile(lat, 50)),
            "p99_ms": 1000 * float(np.percentile(lat, 99)),
            "mean_batch": inferred / batches if batches else float("nan"),
            "server_cpu_s_per_tile": cpu / (len(lat) * per_request), "requests": len(lat)}


def rss_of_jobs(srv: object, slide: Path, jobs: int, seconds: float) -> dict[str, float]:
    """Server and worker RSS after the second (the first ones warm up allocators and caches)
    and after the last of up to `jobs` slide jobs."""
    from serve_helpers import children, wait_job

    def worker_rss() -> float:
        return sum(rss_mib(p) for p in children(srv.proc.pid))

    out: dict[str, float] = {}
    start = time.perf_counter()
    with srv.client() as http:
        done = 0
        while done < max(3, jobs) and (done < 3 or time.perf_counter() - start < seconds):
            job = http.post("/v1/jobs", json={"path": slide.name}).json()
            assert wait_job(http, job["id"])["state"] == "succeeded", job
            http.delete(f"/v1/jobs/{job['id']}")
            done += 1
            if done == 2:
                out |= {"server_first": rss_mib(srv.proc.pid), "worker_first": worker_rss()}
                first_at = time.perf_counter()
    out |= {"jobs": done, "server_last": rss_mib(srv.proc.pid), "worker_last": worker_rss(),
            "seconds_per_job": (time.perf_counter() - first_at) / (done - 2)}
    out["server_mib_per_job"] = (out["server_last"] - out["server_first"]) / (done - 2)
    out["worker_mib_per_job"] = (out["worker_last"] - out["worker_first"]) / (done - 2)
    return out


def main() -> None:
    from serve_helpers import running_server

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="tiny", choices=["tiny", "resnet18"])
    ap.add_argument("--tile-px", type=int, default=None, help="default: 64 tiny, 224 resnet18")
    ap.add_argument("--tiles-per-request", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    ap.add_argument("--seconds", type=float, default=6.0, help="per concurrency level and round")
    ap.add_argument("--rounds", type=int, default=3, help="repeats, for a spread")
    ap.add_argument("--rss-requests", type=int, default=10_000, help="0 to skip the RSS check")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--before", type=Path, default=None,
                    help="a checkout of older code to compare with, in the same run")
    ap.add_argument("--levels", default="1,8,32", help="client concurrencies")
    ap.add_argument("--slide-jobs", type=int, default=0, help="slide jobs for the RSS check")
    ap.add_argument("--slide", type=Path, default=None, help="the slide of those jobs")
    ap.add_argument("--jobs-seconds", type=float, default=180.0,
                    help="stop the slide jobs after this long")
    args = ap.parse_args()
    tile_px = args.tile_px or (224 if args.backbone == "resnet18" else 64)
    report: dict[str, object] = {"backbone": args.backbone, "tile_px": tile_px,
                                 "tiles_per_request": args.tiles_per_request,
                                 "max_batch": args.max_batch,
                                 "max_queue_delay_ms": args.max_queue_delay_ms}
    print(f"{args.backbone} {tile_px} px, {args.tiles_per_request} tiles a request, max batch "
          f"{args.max_batch}, delay {args.max_queue_delay_ms:g} ms; each service level is "
          "compared with the engine alone measured just before and after it")
    levels = [int(v) for v in args.levels.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        model = export_model(args.backbone, tile_px, work)
        tiles = bench_tiles(tile_px)
        engine = Engine(model, device="cpu")
        options = ["--max-batch", str(args.max_batch), "--max-queue-delay-ms",
                   str(args.max_queue_delay_ms), "--max-tiles-per-request",
                   str(max(64, args.tiles_per_request))]
        if args.slide is not None:
            options += ["--slides-root", str(args.slide.resolve().parent)]
        codes = {"after": ROOT} | ({"before": args.before.resolve()} if args.before else {})
        servers = {name: stack.enter_context(running_server(model, work / f"data-{name}",
                                                            *options, root=code))
                   for name, code in codes.items()}
        for name, srv in servers.items():
            got = Client(int(srv.url.rsplit(":", 1)[1]), "histocsc").infer(tiles[:8])
            assert np.abs(got - engine.predict(tiles[:8])).max() <= 1e-6, f"{name} != engine"
        rows: dict[str, list[dict[str, float]]] = {f"{n} {c}": [] for c in levels
                                                   for n in servers}
        for _ in range(args.rounds):
            for clients in levels:
                for name, srv in servers.items():
                    port = int(srv.url.rsplit(":", 1)[1])
                    half = args.seconds / 2
                    e1, c1 = engine_rate(engine, tiles, args.max_batch, half)
                    row = level(port, srv.proc.pid, tiles, args.tiles_per_request, clients,
                                args.seconds)
                    e2, c2 = engine_rate(engine, tiles, args.max_batch, half)
                    row["engine_tiles_per_s"] = (e1 + e2) / 2
                    row["ratio_to_engine"] = row["tiles_per_s"] / row["engine_tiles_per_s"]
                    # CPU per tile hardly depends on what else runs: engine / server is the
                    # share of the server's CPU that goes to the model
                    row["cpu_efficiency"] = (c1 + c2) / 2 / row["server_cpu_s_per_tile"]
                    rows[f"{name} {clients}"].append(row)
        report["concurrency"] = rows
        for key, runs in rows.items():
            def med(k: str, runs: list = runs) -> float:
                return float(np.median([r[k] for r in runs]))
            ratios = [r["ratio_to_engine"] for r in runs]
            name, clients = key.split()
            print(f"{name:6s} concurrency {int(clients):2d}: {med('tiles_per_s'):6.0f} tiles/s vs "
                  f"engine {med('engine_tiles_per_s'):6.0f}: ratio {np.median(ratios):.2f}x "
                  f"[{min(ratios):.2f}-{max(ratios):.2f} over {len(runs)} rounds], "
                  f"p50 {med('p50_ms'):.1f} ms, p99 {med('p99_ms'):.1f} ms, "
                  f"mean batch {med('mean_batch'):.1f} tiles; engine CPU / server CPU "
                  f"per tile {med('cpu_efficiency'):.2f}")
        srv = servers["after"]
        port = int(srv.url.rsplit(":", 1)[1])
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
        for name, srv in servers.items() if args.slide_jobs and args.slide else ():
            jobs = rss_of_jobs(srv, args.slide, args.slide_jobs,
                               args.jobs_seconds / len(servers))
            report[f"slide_jobs_{name}"] = jobs
            print(f"{name:6s} slide jobs of {args.slide.name}: {jobs['jobs']} in a row "
                  f"({jobs['seconds_per_job']:.1f} s each); server RSS "
                  f"{jobs['server_first']:.1f} (after 2) -> {jobs['server_last']:.1f} MiB "
                  f"({jobs['server_mib_per_job']:+.3f} MiB a job), job worker RSS "
                  f"{jobs['worker_first']:.1f} -> {jobs['worker_last']:.1f} MiB "
                  f"({jobs['worker_mib_per_job']:+.3f} MiB a job)")
    print("load:", os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
