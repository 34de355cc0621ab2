"""`histocsc serve`: the HTTP service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histocsc.cli.app import app, user_errors


@app.command()
@user_errors
def serve(
    model: Annotated[Path, typer.Option("--model", help="ONNX model from `histocsc export`.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    slides_root: Annotated[
        Path | None, typer.Option(help="Folder that slide-job paths must lie inside.")
    ] = None,
    data: Annotated[Path, typer.Option(help="Folder for job state and outputs.")] = Path(
        "histocsc-serve"),
    api_key_file: Annotated[
        Path | None, typer.Option(help="File holding the key every call but health needs.")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Dynamic batching: tiles per run.")] = 64,
    max_queue_delay_ms: Annotated[
        float, typer.Option(help="Dynamic batching: longest wait for a fuller batch.")
    ] = 5.0,
    max_tiles_per_request: Annotated[int, typer.Option(help="Tiles in one request.")] = 256,
    max_upload_mb: Annotated[float, typer.Option(help="Largest slide upload, MiB.")] = 4096.0,
    max_uploads_in_flight_mb: Annotated[float | None, typer.Option(
        help="Bytes of uploads received at once, MiB (default: twice --max-upload-mb).")] = None,
    max_queued_jobs: Annotated[int, typer.Option(help="Jobs queued or running before 429.")] = 16,
    max_slide_px: Annotated[int, typer.Option(
        help="Largest slide width or height (level-0 px) a job may declare.")] = 250_000,
    header_timeout: Annotated[float, typer.Option(
        help="Seconds a connection may take to send a request's headers.")] = 10.0,
    model_name: Annotated[str, typer.Option(help="Model name in /v2/models/NAME.")] = "histocsc",
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Serve the model over HTTP: Open Inference Protocol (KServe v2) tiles and slide jobs."""
    from histocsc.serve.app import run_server
    from histocsc.serve.service import ServeSettings

    run_server(ServeSettings(
        model=model, host=host, port=port, slides_root=slides_root, data=data,
        api_key_file=api_key_file, max_batch=max_batch, max_queue_delay_ms=max_queue_delay_ms,
        max_tiles_per_request=max_tiles_per_request, max_upload_mb=max_upload_mb,
        max_uploads_in_flight_mb=max_uploads_in_flight_mb, max_queued_jobs=max_queued_jobs,
        max_slide_px=max_slide_px, header_timeout_s=header_timeout, model_name=model_name,
        device=device))
