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
def running_server(model: Path, data: Path, *args: str, headers: dict[str, str] | None = None,
                   root: Path = ROOT) -> Iterator[Server]:
    """Start `histocsc serve` (the code in `root`), wait until ready, stop it with SIGTERM on
    exit."""
    port = free_port()
    log = data.parent / f"{data.name}-{port}.log"
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "NO_ALBUMENTATIONS_UPDATE": "1"}
    cmd = [sys.executable, "-m", "histocsc", "serve", "--model", str(model), "--port", str(port),
           "--data", str(data), "--device", "cpu", *args]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
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
    return wait_state(client, job_id, ("succeeded", "failed", "cancelled"), timeout)


def hostile_slide(path: Path, side: int = 40000, tile: int = 256) -> Path:
    """A tiled TIFF of 394 KB declaring `side` x `side` px at 0.5 µm/px: one stored tile
    (uncompressed pink tissue), which every tile offset points at. Opening it is instant;
    its tissue mask decodes that tile ~25,000 times (about a minute and more)."""
    import struct

    n = (-(-side // tile)) ** 2
    pixels = np.empty((tile, tile, 3), np.uint8)
    pixels[:] = (225, 140, 185)
    data = pixels.tobytes()
    entries = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 3, None), (259, 3, 1, 1),
               (262, 3, 1, 2), (277, 3, 1, 3), (282, 5, 1, None), (283, 5, 1, None),
               (284, 3, 1, 1), (296, 3, 1, 3), (322, 3, 1, tile), (323, 3, 1, tile),
               (324, 4, n, None), (325, 4, n, None)]
    ifd_at = 8 + len(data)
    extra_at = ifd_at + 2 + 12 * len(entries) + 4
    extras = {258: struct.pack("<3H", 8, 8, 8), 282: struct.pack("<2I", 20000, 1),
              283: struct.pack("<2I", 20000, 1), 324: struct.pack(f"<{n}I", *[8] * n),
              325: struct.pack(f"<{n}I", *[len(data)] * n)}
    ifd, blob = [struct.pack("<H", len(entries))], b""
    for tag, kind, count, value in entries:
        if value is None:
            ifd.append(struct.pack("<HHII", tag, kind, count, extra_at + len(blob)))
            blob += extras[tag]
        elif kind == 3:
            ifd.append(struct.pack("<HHIHH", tag, kind, count, value, 0))
        else:
            ifd.append(struct.pack("<HHII", tag, kind, count, value))
    ifd.append(struct.pack("<I", 0))
    path.write_bytes(b"II*\x00" + struct.pack("<I", ifd_at) + data + b"".join(ifd) + blob)
    return path


def children(pid: int) -> list[int]:
    """The child processes of `pid` (the slide-job worker of a server)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def limit_writes(pids: list[int], limit: int) -> None:
    """Set RLIMIT_FSIZE of running processes: 0 makes every file write fail (EFBIG), as a full
    disk does; RLIM_INFINITY frees the space again."""
    import resource

    for pid in pids:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def raw_request(url: str, head: bytes, timeout: float = 30) -> socket.socket:
    """A socket to the server of `url` that has sent `head` (a request, whole or in part)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.sendall(head)
    return sock


def multipart(name: str, data: bytes, boundary: str = "histocsc-test-boundary") -> tuple[
        bytes, str]:
    """A multipart/form-data body with one `slide` file, and its content type."""
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"slide\"; "
            f"filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    body += data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def wait_state(client: httpx.Client, job_id: str, states: tuple[str, ...],
               timeout: float = 120) -> dict:
    """Poll a job until its state is one of `states`."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def read_reply(sock: socket.socket) -> str:
    """The status line, headers and body of one HTTP reply on a raw socket ('' if closed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data.decode(errors="replace")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return (head + b"\r\n\r\n" + body).decode(errors="replace")
