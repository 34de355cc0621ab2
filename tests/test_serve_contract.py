"""`histocsc serve` keeps its contract with clients (issue 24): 400 for every bad input, no
server path in what clients see, limits as documented, health checks outside the queue, and an
OpenAPI schema that Schemathesis checks against the live server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_helpers import (
    TILE,
    export_tiny_model,
    raw_request,
    read_reply,
    running_server,
    synthetic_slide,
    wait_job,
)

MAX_TILES = 64
ST_CONFIG = """
[[operations]]
include-path-regex = "^/v2/models/"
parameters = { "path.name" = "histocsc" }

# A schema cannot say that `data` holds N x H x W x 3 values for `shape`, nor that an upload's
# bytes are a slide: for these two, a schema-valid request may also be a 400 naming the problem.
[[operations]]
include-path = "/v2/models/{name}/infer"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404", "429"]

[[operations]]
include-path = "/v1/jobs"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "403", "404", "429"]
"""

PROBE = """
import sys, time, httpx
slowest = 0.0
with httpx.Client(base_url=sys.argv[1], timeout=5) as probe:
    for _ in range(10):
        for path in ("/v2/health/live", "/v2/health/ready"):
            t0 = time.perf_counter()
            assert probe.get(path).status_code == 200
            slowest = max(slowest, time.perf_counter() - t0)
        time.sleep(0.3)
print(slowest)
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contract")
    slides = root / "slides"
    (slides / "sub").mkdir(parents=True)
    synthetic_slide(slides / "sub" / "synthetic.tif")
    (slides / "broken.svs").write_bytes(b"II*\x00" + bytes(4000))
    os.symlink("loop.svs", slides / "loop.svs")  # a symlink loop inside the root
    return {"root": root, "model": export_tiny_model(root), "slides": slides}


@pytest.fixture(scope="module")
def server(work: dict[str, Path]):
    with running_server(work["model"], work["root"] / "data", "--slides-root",
                        str(work["slides"]), "--max-tiles-per-request", str(MAX_TILES),
                        "--header-timeout", "1") as srv:
        yield srv


def infer(http: httpx.Client, body: bytes | dict) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post("/v2/models/histocsc/infer", content=content,
                     headers={"content-type": "application/json"})


def tensor(n: int = 1, **extra: object) -> dict:
    return {"name": "tiles", "datatype": "UINT8", "shape": [n, TILE, TILE, 3],
            "data": [7] * (n * TILE * TILE * 3), **extra}


def test_every_bad_input_is_a_400_with_an_error(server) -> None:
    jobs = [
        ({"path": "a" * 300}, "too long"),
        ({"path": "a/" * 2500}, "longer than"),
        (b'{"path": "sub/synthetic.tif", "slide_mpp": 1' + b"0" * 400 + b"}", "slide_mpp"),
        ({"path": "sub/synthetic.tif", "slide_mpp": True}, "slide_mpp"),
        ({"path": "sub/synthetic.tif", "slide_mpp": "0.5"}, "slide_mpp"),
        (b"[" * 30000, "JSON"),
        ({"path": "loop.svs"}, "symlink loop"),
    ]
    good = tensor()
    tiles = [
        (b"[" * 100000, "JSON"),
        ({"inputs": [{**good, "parameters": 5}]}, "parameters"),
        ({"inputs": [{**good, "parameters": "binary_data_size"}]}, "parameters"),
        ({"inputs": [good], "outputs": [{"name": "probabilities", "parameters": [1]}]},
         "parameters"),
        ({"inputs": [good], "outputs": [{"name": "probabilities", "parameters": "x"}]},
         "parameters"),
        ({"inputs": [good], "parameters": [1]}, "parameters"),
        ({"inputs": [good], "parameters": "binary_data_output"}, "parameters"),
    ]
    with server.client() as http:
        for body, words in jobs:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            res = http.post("/v1/jobs", content=content,
                            headers={"content-type": "application/json"})
            assert res.status_code == 400, (content[:80], res.text)
            assert set(res.json()) == {"error"} and words in res.json()["error"], res.text
        for body, words in tiles:
            res = infer(http, body)
            assert res.status_code == 400, (str(body)[:80], res.text)
            assert words in res.json()["error"], res.text
    assert "Traceback" not in server.log_text()


def test_clients_never_see_server_paths(server, work: dict[str, Path]) -> None:
    secret = str(work["root"])
    with server.client() as http:
        res = http.post("/v1/jobs", json={"path": "broken.svs"})
        assert res.status_code == 400 and "broken.svs" in res.text and secret not in res.text
        res = http.post("/v1/jobs", files={"slide": ("x" * 300 + ".svs", b"II*\x00")})
        assert res.status_code == 400 and "longer than" in res.text
        assert secret not in res.text and "jobs/" not in res.text
        slide = work["slides"] / "sub" / "synthetic.tif"
        by_path = http.post("/v1/jobs", json={"path": "sub/synthetic.tif"}).json()
        by_upload = http.post("/v1/jobs", files={"slide": ("mine.tif", slide.read_bytes())}
                              ).json()
        for job, shown in ((by_path, "sub/synthetic.tif"), (by_upload, "mine.tif")):
            done = wait_job(http, job["id"])
            assert done["state"] == "succeeded" and done["slide"] == shown, done
            for name in ("summary.json", "run_manifest.json", "report.html", "tiles.geojson"):
                text = http.get(f"/v1/jobs/{job['id']}/outputs/{name}").text
                assert secret not in text and "/jobs/" not in text, (name, shown)
            summary = http.get(f"/v1/jobs/{job['id']}/outputs/summary.json").json()
            assert summary["slide"]["path"] == shown
            assert summary["model"]["path"] == "model.onnx"


def test_json_body_of_the_documented_tile_count_is_accepted(server) -> None:
    batch = np.full((MAX_TILES, TILE, TILE, 3), 255, np.uint8)
    body = {"inputs": [{"name": "tiles", "datatype": "UINT8", "shape": list(batch.shape),
                        "data": batch.tolist()}]}
    with server.client() as http:
        res = infer(http, json.dumps(body).encode())  # Python's default separators
        assert res.status_code == 200, res.text[:200]
        assert np.array(res.json()["outputs"][0]["data"]).size == MAX_TILES * 2


def test_half_sent_requests_are_closed(server) -> None:
    t0 = time.monotonic()
    idle = raw_request(server.url, b"")
    half = raw_request(server.url, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
    for sock in (idle, half):
        reply = read_reply(sock)
        assert reply.startswith("HTTP/1.1 408") or reply == "", reply
        assert sock.recv(100) == b""  # closed by the server
        sock.close()
    assert time.monotonic() - t0 < 15  # --header-timeout 1, not the client's 30 s


@pytest.mark.slow
def test_health_answers_at_once_while_inference_is_overloaded(server) -> None:
    body = json.dumps({"inputs": [tensor(MAX_TILES)]}).encode()
    stop = time.monotonic() + 6
    statuses: list[int] = []

    def flood() -> None:
        with server.client() as c:
            while time.monotonic() < stop:
                statuses.append(infer(c, body).status_code)

    threads = [threading.Thread(target=flood) for _ in range(48)]  # > the 40 of a thread pool
    for t in threads:
        t.start()
    time.sleep(2)
    # the probe runs in its own process: this one is busy with the 48 clients
    probe = subprocess.run([sys.executable, "-c", PROBE, server.url], capture_output=True,
                           text=True, timeout=120)
    for t in threads:
        t.join()
    assert statuses and set(statuses) <= {200, 429}, set(statuses)
    assert probe.returncode == 0, probe.stderr
    slowest = float(probe.stdout)
    print(f"slowest health probe under load: {slowest:.3f} s")
    # queued behind inference (before) a probe timed out at 5 s; answered outside the queue it
    # takes ~0.05 s on a quiet machine: the bound leaves room for a shared CI runner
    assert slowest < 4.0, f"a health probe took {slowest:.2f} s under load"


def test_the_schema_describes_the_server(server) -> None:
    with server.client() as http:
        schema = http.get("/openapi.json").json()
        res = http.options("/v1/jobs/abc")
        assert res.status_code == 405 and {"GET", "DELETE"} <= {
            m.strip() for m in res.headers["allow"].split(",")}
    assert '"422"' not in json.dumps(schema)
    paths = schema["paths"]
    assert "202" in paths["/v1/jobs/{job_id}"]["delete"]["responses"]
    assert {"400", "403", "404", "413", "415", "429"} <= set(paths["/v1/jobs"]["post"]
                                                             ["responses"])
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    states = schema["components"]["schemas"]["JobView"]["properties"]["state"]["enum"]
    assert states == ["queued", "running", "succeeded", "failed", "cancelled"]


@pytest.mark.slow
def test_schemathesis_finds_no_5xx_and_no_schema_mismatch(server, tmp_path: Path) -> None:
    pytest.importorskip("schemathesis")
    config = tmp_path / "schemathesis.toml"
    config.write_text(ST_CONFIG)
    st = Path(sys.executable).with_name("st")
    with server.client() as http:
        before = http.get("/metrics").text
    res = subprocess.run([str(st), "--config-file", str(config), "run",
                          f"{server.url}/openapi.json", "--checks", "all", "--max-examples", "25",
                          "--seed", "24", "--no-color", "--generation-database", "none",
                          "--request-timeout", "30"],
                         capture_output=True, text=True, timeout=240, cwd=tmp_path)
    tail = res.stdout[-6000:] + res.stderr[-2000:]
    assert res.returncode == 0, tail
    with server.client() as http:
        after = http.get("/metrics").text
    sent = requests_seen(after) - requests_seen(before)
    errors = [line for line in after.splitlines() if 'status="5' in line]
    assert sent > 300 and not errors, (sent, errors)
    assert "Traceback" not in server.log_text()
    print(f"schemathesis: {sent} requests, 0 5xx, 0 failures")


def requests_seen(metrics: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("histocsc_http_requests_total{"))
