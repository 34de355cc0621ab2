"""An onnxruntime session on the asked device: `cuda` is strict, `auto` falls back to the CPU
(and says so) when the CUDA provider is listed but cannot start (e.g. cuDNN missing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from histocsc.errors import ConfigError, ModelError

CPU = ["CPUExecutionProvider"]
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _create(path: Path, opts: Any, providers: list[str]) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own types for a bad file
        raise ModelError(f"{path}: onnxruntime cannot load this model ({exc})") from exc


def open_session(path: Path, opts: Any, providers: list[str], device: str,
                 asked: str) -> tuple[Any, str, str | None]:
    """(session, device used, a note when `auto` fell back to the CPU)."""
    if device != "cuda":
        return _create(path, opts, providers), device, None
    try:
        session = _create(path, opts, providers)
        problem = None if "CUDAExecutionProvider" in session.get_providers() else (
            "onnxruntime could not start it")
    except ModelError as exc:
        session, problem = None, str(exc)
    if problem is None:
        return session, "cuda", None
    if asked == "cuda":
        raise ConfigError(f"{path}: CUDA was asked for but {problem} (check the CUDA / cuDNN "
                          "libraries); use --device cpu")
    note = (f"the CUDA provider is listed but cannot run here ({problem}); "
            "--device auto uses the CPU instead")
    return _create(path, opts, CPU), "cpu", note
