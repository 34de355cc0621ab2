"""`histocsc serve` end to end: a real uvicorn server on 127.0.0.1 in a subprocess, driven by
tritonclient and plain HTTP; slide jobs checked against `histocsc infer`."""

from __future__ import annotations

import csv
import json
import os
import shutil
import threading
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from google.protobuf import text_format
from serve_helpers import (
    MARKERS,
    TILE,
    running_server,
    synthetic_slide,
    wait_job,
)
from serve_helpers import export_tiny_model as export_model
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException
from typer.testing import CliRunner

from histocsc.cli import app
from histocsc.io import file_checksum
from histocsc.predict.engine import Engine
from histocsc.serve.jobs import JobStore

KEY = "s3cret-key-for-tests-0123456789"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    model = export_model(root, triton_repo=root / "triton")
    slides = root / "slides"
    slides.mkdir()
    synthetic_slide(slides / "synthetic.tif")
    outside = root / "outside.svs"
    shutil.copy(slides / "synthetic.tif", outside)
    os.symlink(outside, slides / "link-out.svs")
    return {"root": root, "model": model, "slides": slides, "triton": root / "triton"}


@pytest.fixture(scope="module")
def server(work: dict[str, Path]):
    with running_server(work["model"], work["root"] / "data", "--slides-root",
                        str(work["slides"]), "--max-batch", "16", "--max-queue-delay-ms", "20",
                        "--max-tiles-per-request", "64", "--max-upload-mb", "3") as srv:
        yield srv


@pytest.fixture(scope="module")
def engine(work: dict[str, Path]) -> Engine:
    return Engine(work["model"], device="cpu")


def tiles(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, TILE, TILE, 3), dtype=np.uint8)


def test_health_and_metadata_through_tritonclient(server, engine: Engine) -> None:
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("histocsc")
    meta = client.get_model_metadata("histocsc")
    assert meta["inputs"] == [{"name": "tiles", "datatype": "UINT8", "shape": [-1, TILE, TILE, 3]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32",
                                "shape": [-1, len(MARKERS)]}]
    params = meta["parameters"]
    assert params["markers"] == ",".join(MARKERS) and params["mpp"] == 2.0
    assert json.loads(params["thresholds"]) == {"CD133": 0.45, "CD44": 0.55}
    assert params["checksum"] == engine.checksum
    assert client.get_server_metadata()["name"] == "histocsc"
    with server.client() as http:
        assert http.get("/v2/models/other").status_code == 404
        assert http.get("/docs").status_code == 200
        paths = http.get("/openapi.json").json()["paths"]
        assert {"/v2/models/{name}/infer", "/v1/jobs", "/v1/jobs/{job_id}"} <= set(paths)


def test_probabilities_equal_the_engine(server, engine: Engine) -> None:
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    batch = tiles(0, 7)
    want = engine.predict(batch)
    assert want.std() > 1e-4  # not a constant output
    for binary in (True, False):
        inp = triton.InferInput("tiles", list(batch.shape), "UINT8")
        inp.set_data_from_numpy(batch, binary_data=binary)
        out = triton.InferRequestedOutput("probabilities", binary_data=binary)
        got = client.infer("histocsc", [inp], outputs=[out]).as_numpy("probabilities")
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-6
    # plain JSON with nested data, no outputs named
    body = {"id": "r1", "inputs": [{"name": "tiles", "datatype": "UINT8",
                                    "shape": list(batch.shape), "data": batch.tolist()}]}
    with server.client() as http:
        reply = http.post("/v2/models/histocsc/infer", json=body).json()
    assert reply["id"] == "r1" and reply["model_name"] == "histocsc"
    got = np.array(reply["outputs"][0]["data"], np.float32).reshape(reply["outputs"][0]["shape"])
    assert np.abs(got - want).max() <= 1e-6


def test_32_concurrent_clients(server, engine: Engine) -> None:
    errors: list[str] = []
    results: dict[int, np.ndarray] = {}

    def client_thread(i: int) -> None:
        try:
            client = triton.InferenceServerClient(server.url.removeprefix("http://"))
            for k in range(3):
                batch = tiles(100 + 3 * i + k, 1 + (i + k) % 4)
                inp = triton.InferInput("tiles", list(batch.shape), "UINT8")
                inp.set_data_from_numpy(batch)
                got = client.infer("histocsc", [inp]).as_numpy("probabilities")
                results[3 * i + k] = got
            client.close()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(f"client {i}: {exc!r}")

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 96
    for i in range(32):
        for k in range(3):
            want = engine.predict(tiles(100 + 3 * i + k, 1 + (i + k) % 4))
            assert np.abs(results[3 * i + k] - want).max() <= 1e-6


def infer_raw(http: httpx.Client, body: bytes | dict, headers: dict | None = None,
              model: str = "histocsc") -> httpx.Response:
    url = f"/v2/models/{model}/infer"
    if isinstance(body, dict):
        return http.post(url, json=body, headers=headers)
    return http.post(url, content=body, headers=headers)


def tensor(shape: list[int], datatype: str = "UINT8", data: list | None = None,
           name: str = "tiles") -> dict:
    values = data if data is not None else [7] * int(np.prod(shape))
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": values}]}


def test_bad_tile_requests_are_400_naming_the_problem(server) -> None:
    good = [2, TILE, TILE, 3]
    header = json.dumps({"inputs": [{"name": "tiles", "datatype": "UINT8", "shape": good,
                                     "parameters": {"binary_data_size": 100}}]}).encode()
    cases = [
        (tensor([2, 32, 32, 3]), 400, "shape"),
        (tensor(good, datatype="FP32"), 400, "UINT8"),
        (tensor(good, name="image"), 400, "'image'"),
        (tensor([65, TILE, TILE, 3]), 400, "1 to 64 tiles"),
        (tensor(good, data=[1, 2, 3]), 400, "values"),
        (tensor(good, data=[300] * (2 * TILE * TILE * 3)), 400, "0..255"),
        (tensor(good, data=[0.5] * (2 * TILE * TILE * 3)), 400, "integers"),
        ({"inputs": []}, 400, "exactly one"),
        (b"{not json", 400, "JSON"),
        ({**tensor(good), "outputs": [{"name": "logits"}]}, 400, "logits"),
    ]
    with server.client() as http:
        for body, status, words in cases:
            res = infer_raw(http, body)
            assert res.status_code == status, (body if isinstance(body, bytes) else
                                               str(body)[:200], res.text)
            assert words in res.json()["error"], res.text
        # binary extension: announced size does not match the shape / the bytes sent
        res = infer_raw(http, header + bytes(100),
                        {"Inference-Header-Content-Length": str(len(header))})
        assert res.status_code == 400 and "binary" in res.json()["error"]
        res = infer_raw(http, b"{}", {"Inference-Header-Content-Length": "99"})
        assert res.status_code == 400 and "Inference-Header-Content-Length" in res.text
        assert infer_raw(http, tensor(good), model="nope").status_code == 404
        res = infer_raw(http, b"x" * (64 * TILE * TILE * 3 * 8 + 70000))
        assert res.status_code == 413 and "larger than" in res.json()["error"]
    assert "Traceback" not in server.log_text()


def test_slide_paths_must_stay_inside_the_root(server, work: dict[str, Path]) -> None:
    with server.client() as http:
        for path, status in [("../model.onnx", 403), (str(work["model"]), 403),
                             ("link-out.svs", 403), ("missing.svs", 404),
                             ("../../../../etc/passwd", 403)]:
            res = http.post("/v1/jobs", json={"path": path})
            assert res.status_code == status, (path, res.text)
            assert set(res.json()) == {"error"}
        assert http.post("/v1/jobs", json={"path": 3}).status_code == 400
        res = http.post("/v1/jobs", json={"path": "synthetic.tif", "slide_mpp": -1})
        assert res.status_code == 400 and "slide_mpp" in res.text


def test_bad_uploads(server, work: dict[str, Path], tmp_path: Path) -> None:
    with server.client() as http:
        res = http.post("/v1/jobs", files={"slide": ("broken.svs", b"II*\x00" + bytes(2000))})
        assert res.status_code == 400 and "broken.svs" in res.json()["error"]
        assert str(work["root"]) not in res.text  # no server folders in messages
        res = http.post("/v1/jobs", files={"slide": ("notes.txt", b"hello")})
        assert res.status_code == 400 and "not a slide file" in res.json()["error"]
        big = tmp_path / "big.svs"
        big.write_bytes(bytes(4 * 1024 * 1024))
        with big.open("rb") as f:
            res = http.post("/v1/jobs", files={"slide": ("big.svs", f)})
        assert res.status_code == 413 and "limit" in res.json()["error"]
        res = http.post("/v1/jobs", data={"path": "synthetic.tif"},
                        files={"slide": ("s.tif", (work["slides"] / "synthetic.tif").read_bytes())})
        assert res.status_code == 400 and "exactly one" in res.json()["error"]
        res = http.post("/v1/jobs", content=b"raw", headers={"content-type": "text/plain"})
        assert res.status_code == 415
        assert http.get("/v1/jobs/0123abc").status_code == 404
        assert http.get("/v1/jobs", params={"state": "weird"}).status_code == 400
    # rejected submissions leave no job and no files behind
    assert not list((work["root"] / "data" / "jobs").glob("*/upload/*"))


def test_slide_job_on_real_svs_matches_histocsc_infer(server, work: dict[str, Path],
                                                      real_data: Path, engine: Engine) -> None:
    svs = real_data / "svs" / "cmu-1-small-region.svs"
    shutil.copy(svs, work["slides"] / svs.name)
    cli_out = work["root"] / "cli-infer"
    res = CliRunner().invoke(app, ["infer", str(svs), "--model", str(work["model"]), "--out",
                                   str(cli_out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    want_rows = list(csv.DictReader((cli_out / svs.stem / "scores.csv").open()))
    with server.client() as http:
        by_path = http.post("/v1/jobs", json={"path": svs.name})
        assert by_path.status_code == 202, by_path.text
        with svs.open("rb") as f:
            by_upload = http.post("/v1/jobs", files={"slide": (svs.name, f)})
        assert by_upload.status_code == 202, by_upload.text
        assert by_upload.headers["location"] == f"/v1/jobs/{by_upload.json()['id']}"
        for submitted in (by_path.json(), by_upload.json()):
            job = wait_job(http, submitted["id"])
            assert job["state"] == "succeeded", job
            assert job["tiles_done"] == job["tiles_total"] == len(want_rows) > 20
            assert job["mpp_used"] == pytest.approx(0.499)
            assert job["model_checksum"] == engine.checksum
            assert {"scores.csv", "tiles.geojson", "summary.json", "heatmap_CD133.png",
                    "heatmap_stem_like.png"} <= set(job["outputs"])
            text = http.get(f"/v1/jobs/{job['id']}/outputs/scores.csv").text
            rows = list(csv.DictReader(text.splitlines()))
            assert [(r["x"], r["y"]) for r in rows] == [(r["x"], r["y"]) for r in want_rows]
            for m in MARKERS:
                got = np.array([float(r[m]) for r in rows])
                want = np.array([float(r[m]) for r in want_rows])
                assert np.abs(got - want).max() <= 1e-6
            summary = http.get(f"/v1/jobs/{job['id']}/outputs/summary.json").json()
            assert summary["tiles"] == len(want_rows)
            geo = http.get(f"/v1/jobs/{job['id']}/outputs/tiles.geojson")
            assert geo.headers["content-type"].startswith("application/geo+json")
            assert len(geo.json()["features"]) == len(want_rows)
            png = http.get(f"/v1/jobs/{job['id']}/outputs/heatmap_CD133.png")
            assert png.content.startswith(b"\x89PNG")
            assert http.get(f"/v1/jobs/{job['id']}/outputs/..%2Fjobs.sqlite").status_code == 404
        assert by_upload.json()["slide"] == svs.name  # the client's name, not a server path
        # the slide without a pixel size needs slide_mpp
        tcga = real_data / "svs" / "tcga-cr-7395-01a-01-ts1.svs"
        shutil.copy(tcga, work["slides"] / tcga.name)
        res = http.post("/v1/jobs", json={"path": tcga.name})
        assert res.status_code == 400 and "slide_mpp" in res.json()["error"]
        res = http.post("/v1/jobs", json={"path": tcga.name, "slide_mpp": 0.5})
        assert res.status_code == 202 and res.json()["mpp_used"] == 0.5
        # cancel it: queued or running, it ends cancelled with its files removed
        job_id = res.json()["id"]
        assert http.delete(f"/v1/jobs/{job_id}").status_code in (200, 202)
        job = wait_job(http, job_id)
        assert job["state"] == "cancelled" and job["outputs"] == []
        assert not (work["root"] / "data" / "jobs" / job_id).exists()
        assert http.delete(f"/v1/jobs/{job_id}").json()["deleted"]
        assert http.get(f"/v1/jobs/{job_id}").status_code == 404


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def test_metrics_count_tiles_and_batches(server) -> None:
    with server.client() as http:
        before = http.get("/metrics").text
        for n in (3, 5):
            assert infer_raw(http, tensor([n, TILE, TILE, 3])).status_code == 200
        after = http.get("/metrics").text
    assert metric(after, "histocsc_inference_count_total") - metric(
        before, "histocsc_inference_count_total") == 8
    execs = metric(after, "histocsc_inference_exec_count_total")
    assert 1 <= execs <= metric(after, "histocsc_inference_count_total")
    for name in ("histocsc_queue_duration_seconds_count", "histocsc_compute_duration_seconds_sum",
                 'histocsc_jobs{state="succeeded"}',
                 'histocsc_tiles_processed_total{source="infer"}',
                 'histocsc_inference_requests_total{outcome="failure"}',
                 'histocsc_http_requests_total{method="POST",route="/v2/models/{name}/infer"'):
        assert name in after, name


def test_restart_keeps_finished_jobs_and_fails_interrupted_ones(work: dict[str, Path]) -> None:
    data = work["root"] / "restart-data"
    slide = work["slides"] / "synthetic.tif"
    with running_server(work["model"], data) as srv, srv.client() as http:
        res = http.post("/v1/jobs", files={"slide": (slide.name, slide.read_bytes())})
        assert res.status_code == 202, res.text
        job = wait_job(http, res.json()["id"])
        assert job["state"] == "succeeded", job
        scores = http.get(f"/v1/jobs/{job['id']}/outputs/scores.csv").content
        assert scores.count(b"\n") > 10
    # a clean stop on SIGTERM (uvicorn re-raises the signal after its graceful shutdown)
    assert srv.proc.returncode in (0, -15), srv.log_text()
    assert "Application shutdown complete" in srv.log_text()
    # a job the stopped server left running (as after a crash)
    store = JobStore(data)
    store.add("feed", slide, "path", None, 1.0, 2.0, "x")
    assert store.next_queued().id == "feed"
    store.close()
    with running_server(work["model"], data) as srv, srv.client() as http:
        jobs = {j["id"]: j for j in http.get("/v1/jobs").json()["jobs"]}
        assert jobs[job["id"]]["state"] == "succeeded"
        assert http.get(f"/v1/jobs/{job['id']}/outputs/scores.csv").content == scores
        assert jobs["feed"]["state"] == "failed" and "interrupted" in jobs["feed"]["error"]


def test_api_key_and_bounded_queue(work: dict[str, Path]) -> None:
    key_file = work["root"] / "key.txt"
    key_file.write_text(KEY + "\n")
    slide = work["slides"] / "synthetic.tif"
    auth = {"Authorization": f"Bearer {KEY}"}
    with running_server(work["model"], work["root"] / "auth-data", "--api-key-file",
                        str(key_file), "--max-queued-jobs", "1") as srv:
        with httpx.Client(base_url=srv.url) as anon:
            assert anon.get("/v2/health/live").status_code == 200
            assert anon.get("/v2/health/ready").status_code == 200
            for path in ("/v2/models/histocsc", "/v1/jobs", "/metrics", "/docs", "/v2"):
                res = anon.get(path)
                assert res.status_code == 401 and "API key" in res.json()["error"], path
            assert anon.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}
                            ).status_code == 401
            assert anon.get("/v1/jobs", headers={"Authorization": KEY}).status_code == 401
        client = triton.InferenceServerClient(srv.url.removeprefix("http://"))
        with pytest.raises(InferenceServerException, match="401|API key"):
            client.get_model_metadata("histocsc")
        assert client.get_model_metadata("histocsc", headers=auth)["name"] == "histocsc"
        with httpx.Client(base_url=srv.url, headers=auth, timeout=120) as http:
            res = http.post("/v1/jobs", json={"path": "x.svs"})
            assert res.status_code == 403 and "--slides-root" in res.json()["error"]
            first = http.post("/v1/jobs", files={"slide": (slide.name, slide.read_bytes())})
            assert first.status_code == 202
            full = http.post("/v1/jobs", files={"slide": (slide.name, slide.read_bytes())})
            assert full.status_code == 429 and int(full.headers["retry-after"]) > 0
            assert wait_job(http, first.json()["id"])["state"] == "succeeded"
            again = http.post("/v1/jobs", files={"slide": (slide.name, slide.read_bytes())})
            assert again.status_code == 202


def test_triton_repository_parses_with_tritons_schema(work: dict[str, Path]) -> None:
    folder = work["triton"] / "histocsc"
    config = text_format.Parse((folder / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert config.name == "histocsc" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 64
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    model = folder / "1" / "model.onnx"
    assert model.read_bytes() == work["model"].read_bytes()
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    dtypes = {"tensor(uint8)": model_config_pb2.TYPE_UINT8,
              "tensor(float)": model_config_pb2.TYPE_FP32}
    for cfg, node in ((config.input, inp), (config.output, out)):
        assert [c.name for c in cfg] == [node.name]
        assert cfg[0].data_type == dtypes[node.type]
        assert list(cfg[0].dims) == node.shape[1:]  # Triton dims exclude the batch axis
        assert not isinstance(node.shape[0], int)  # the graph's batch axis is dynamic
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["markers"] == ",".join(MARKERS) and params["checksum"] == file_checksum(model)
    res = CliRunner().invoke(app, ["export", str(work["root"] / "run"), "--out",
                                   str(work["root"] / "again.onnx"), "--triton-repo",
                                   str(work["triton"])])
    assert res.exit_code == 1 and "already exists" in res.output
