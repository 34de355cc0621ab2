"""Helpers of the serve tests: a tiny exported model, a synthetic slide, a real server process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import httpx
import numpy as np
import torch
from typer.testing import CliRunner

from histocsc.cli import app
from histocsc.learn.model import META_KEY, build_model
from histocsc.wsi.pyramid import write_pyramid_tiff_from_array

ROOT = Path(__file__).resolve().parents[1]
TILE, MPP = 48, 2.0
MARKERS = ["CD133", "CD44"]
META = {"markers": MARKERS, "tile_px": TILE, "mpp": MPP, "backbone": "tiny",
        "mean": [0.8, 0.6, 0.75], "std": [0.1, 0.15, 0.1],
        "thresholds": {"CD133": 0.45, "CD44": 0.55}, "summary": {"note": "untrained"}}


def export_tiny_model(folder: Path, triton_repo: Path | None = None) -> Path:
    """A tiny untrained model saved as a training checkpoint and exported by `histocsc export`
    (optionally with --triton-repo)."""
    torch.manual_seed(0)
    model = build_model("tiny", len(MARKERS)).eval()
    ckpt = folder / "run" / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, META_KEY: dict(META)}, ckpt)
    out = folder / "model.onnx"
    args = ["export", str(folder / "run"), "--out", str(out)]
    if triton_repo is not None:
        args += ["--triton-repo", str(triton_repo)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return out


def synthetic_slide(path: Path, seed: int = 0) -> Path:
    """A small pyramidal TIFF at 1 µm/px: a pink tissue ellipse with purple nuclei on glass."""
    rng = np.random.default_rng(seed)
    img = np.full((600, 800, 3), 244, np.uint8)
    cv2.ellipse(img, (400, 300), (300, 200), 15, 0, 360, (225, 140, 185), -1)
    for _ in range(800):
        x, y = int(rng.integers(120, 680)), int(rng.integers(120, 480))
        cv2.circle(img, (x, y), int(rng.integers(2, 5)), (90, 50, 140), -1)
    write_pyramid_tiff_from_array(path, img, 1.0, tile=128)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A `histocsc serve` subprocess on 127.0.0.1."""

    url: str
    proc: subprocess.Popen
    log: Path
    headers: dict[str, str]

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, headers=self.headers, **kwargs)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def running_server(model: Path, data: Path, *args: str,
                   headers: dict[str, str] | None = None) -> Iterator[Server]:
    """Start `histocsc serve`, wait until ready, stop it with SIGTERM on exit."""
    port = free_port()
    log = data.parent / f"{data.name}-{port}.log"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "NO_ALBUMENTATIONS_UPDATE": "1"}
    cmd = [sys.executable, "-m", "histocsc", "serve", "--model", str(model), "--port", str(port),
           "--data", str(data), "--device", "cpu", *args]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    server = Server(f"http://127.0.0.1:{port}", proc, log, headers or {})
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready:\n{server.log_text()}")
            time.sleep(0.2)
        yield server
    finally:
        stop(server)


def stop(server: Server) -> int:
    """SIGTERM, then the exit code (killed after 60 s)."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(60)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return int(server.proc.returncode)


def wait_job(client: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    """Poll a job until it is finished."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
