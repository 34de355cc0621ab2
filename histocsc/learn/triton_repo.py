"""A Triton / KServe model repository for an exported model: `<repo>/<name>/config.pbtxt` and
`<repo>/<name>/1/model.onnx` (and its external-data file, for
a graph over 2 GB), the input / output names and dims read from the graph itself.

The config enables Triton's dynamic batching and carries the histocsc metadata (markers, mpp,
tile size, thresholds, checksum) as model parameters.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from histocsc.errors import ConfigError, ModelError
from histocsc.io import file_checksum
from histocsc.learn.metadata import INPUT, OUTPUT, read_metadata

DEFAULT_NAME = "histocsc"


def graph_dims(model: Path) -> tuple[list[int], list[int]]:
    """Dims after the batch axis of the `tiles` input (uint8) and `probabilities` output
    (float32); ModelError if the graph is not a histocsc tile model."""
    import onnx

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as exc:  # onnx raises several types for a bad file
        raise ModelError(f"{model}: not a readable ONNX model ({exc})") from exc
    io = {"input": list(proto.graph.input), "output": list(proto.graph.output)}
    want = {"input": (INPUT, onnx.TensorProto.UINT8), "output": (OUTPUT, onnx.TensorProto.FLOAT)}
    dims: dict[str, list[int]] = {}
    for kind, (name, elem) in want.items():
        found = [v for v in io[kind] if v.name == name]
        if len(found) != 1 or found[0].type.tensor_type.elem_type != elem:
            raise ModelError(f"{model}: expected {kind} {name!r} of type "
                             f"{onnx.TensorProto.DataType.Name(elem)}, got "
                             f"{[v.name for v in io[kind]]}")
        shape = found[0].type.tensor_type.shape.dim
        rest = [d.dim_value if d.HasField("dim_value") else -1 for d in shape[1:]]
        if not shape or shape[0].HasField("dim_value"):
            raise ModelError(f"{model}: {kind} {name!r} has no dynamic batch axis")
        dims[kind] = rest
    return dims["input"], dims["output"]


def external_files(model: Path) -> list[Path]:
    """The external-data files a graph names (beside it), for a graph over 2 GB."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    names = {e.value for t in proto.graph.initializer for e in t.external_data
             if e.key == "location"}
    missing = [n for n in sorted(names) if not (model.parent / n).is_file()]
    if missing:
        raise ModelError(f"{model}: its external data {', '.join(missing)} is not beside it")
    return [model.parent / n for n in sorted(names)]


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def config_text(name: str, input_dims: list[int], output_dims: list[int], max_batch: int,
                max_queue_delay_us: int, parameters: dict[str, str]) -> str:
    """config.pbtxt for the ONNX Runtime backend with dynamic batching."""
    def dims(values: list[int]) -> str:
        return ", ".join(str(v) for v in values)

    params = "".join(f"parameters {{ key: {_quote(k)} value: {{ string_value: {_quote(v)} }} }}\n"
                     for k, v in parameters.items())
    return (
        f"name: {_quote(name)}\n"
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch}\n"
        "input [\n"
        f'  {{ name: "{INPUT}", data_type: TYPE_UINT8, dims: [ {dims(input_dims)} ] }}\n'
        "]\n"
        "output [\n"
        f'  {{ name: "{OUTPUT}", data_type: TYPE_FP32, dims: [ {dims(output_dims)} ] }}\n'
        "]\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}\n"
        f"{params}"
    )


def write_triton_repo(model: str | Path, repo: str | Path, name: str = DEFAULT_NAME,
                      max_batch: int = 64, max_queue_delay_us: int = 5000) -> Path:
    """Write `<repo>/<name>/` (config.pbtxt, 1/model.onnx) for `model`; returns that folder.

    Refuses to replace an existing `<repo>/<name>/`. The folder appears whole or not at all.
    """
    model, repo = Path(model), Path(repo)
    if max_batch < 1:
        raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
    dest = repo / name
    if dest.exists():
        raise ConfigError(f"{dest}: already exists; remove it or choose another --triton-repo")
    input_dims, output_dims = graph_dims(model)
    meta = read_metadata(model)
    params = {"markers": ",".join(meta["markers"]), "mpp": repr(meta["mpp"]),
              "tile_px": str(meta["tile_px"]), "thresholds": json.dumps(meta["thresholds"]),
              "precision": meta["precision"], "checksum": file_checksum(model)}
    text = config_text(name, input_dims, output_dims, max_batch, max_queue_delay_us, params)
    repo.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo))
    try:
        (tmp / "1").mkdir()
        shutil.copyfile(model, tmp / "1" / "model.onnx")
        for data in external_files(model):  # ONNX external data keeps its name beside the graph
            shutil.copyfile(data, tmp / "1" / data.name)
        (tmp / "config.pbtxt").write_text(text)
        for p in (tmp, tmp / "1"):
            os.chmod(p, 0o755)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
