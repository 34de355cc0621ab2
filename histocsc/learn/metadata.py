"""The model contract: tensor names and the ONNX `metadata_props` keys, each with its type.

`ModelMeta` is the one owner of both. Export writes it (`to_props`), the Triton writer, the
inference engine and the service read it (`from_props` / `read_metadata`), so no name or key is
spelled twice. No torch: inference imports this module.

Adding a key: add a field with a default (old models decode with it) and, where its type is not
str / int / float, name its codec in the field's metadata (`_json()`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from histocsc import __version__
from histocsc.errors import ModelError

# Markers of cancer stem-like cells: a model's "stem-like" map joins those of its markers that are
# in this set unless export is told otherwise (`--stem-like`); other markers get no stem-like map.
STEM_CELL_MARKERS = frozenset({"CD133", "PROM1", "CD44", "ALDH1", "ALDH1A1", "LGR5", "SOX2",
                               "OCT4", "NANOG", "CD24", "CD90", "EPCAM", "CD166", "BMI1"})


def default_stem_like(markers: list[str]) -> list[str]:
    """The markers that make up the stem-like map when export was not told: the model's markers
    that are stem-cell markers (STEM_CELL_MARKERS, case-insensitive), in model order."""
    return [m for m in markers if m.upper() in STEM_CELL_MARKERS]


def check_stem_like(stem_like: list[str], markers: list[str]) -> list[str]:
    """`stem_like` checked against the model's markers (ModelError naming the stranger)."""
    strangers = [m for m in stem_like if m not in markers]
    if strangers:
        raise ModelError(f"stem-like marker(s) {', '.join(strangers)} are not among the model's "
                         f"markers ({', '.join(markers)})")
    return list(dict.fromkeys(stem_like))



INPUT = "tiles"  # uint8 (N, tile_px, tile_px, 3) RGB
OUTPUT = "probabilities"  # float32 (N, markers), calibrated
EMBEDDINGS = "embeddings"  # float32 (N, embedding_dim), only with `export --embeddings`


def _json(default: Any = None) -> Any:
    """A field stored as JSON text (lists, dicts)."""
    factory = (lambda: type(default)(default)) if default is not None else dict
    return field(default_factory=factory, metadata={"codec": "json"})


@dataclass
class ModelMeta:
    """Every metadata key of an exported histocsc model, typed. Required: markers, tile_px, mpp."""

    INPUT: ClassVar[str] = INPUT
    OUTPUT: ClassVar[str] = OUTPUT
    EMBEDDINGS: ClassVar[str] = EMBEDDINGS
    REQUIRED: ClassVar[tuple[str, ...]] = ("markers", "tile_px", "mpp")

    markers: list[str] = field(metadata={"codec": "json"})
    tile_px: int
    mpp: float
    thresholds: dict[str, float] = _json({})
    histocsc_version: str = __version__
    training_summary: dict[str, Any] = _json({})
    backbone: str = ""
    mean: list[float] = _json([0.0, 0.0, 0.0])
    std: list[float] = _json([1.0, 1.0, 1.0])
    calibration: dict[str, Any] = _json({})
    precision: str = "fp32"  # fp32 | fp16 | int8
    exporter: str = ""  # dynamo | torchscript
    encoder: dict[str, Any] = _json({})  # preset, architecture, input_px, embedding rule/dim
    weights_checksum: str = ""  # sha256 of model.weights_path ("" when trained from scratch)
    outputs: list[str] = _json([OUTPUT])  # output tensors of the graph, in order
    # the markers the stem-like map joins; None (a model from before the key): default_stem_like
    stem_like_markers: list[str] | None = field(default=None, metadata={"codec": "json"})

    def __post_init__(self) -> None:
        self.markers = [str(m) for m in self.markers]
        self.tile_px, self.mpp = int(self.tile_px), float(self.mpp)
        self.thresholds = {m: float(self.thresholds.get(m, 0.5)) for m in self.markers}
        self.mean = [float(v) for v in self.mean]
        self.std = [float(v) for v in self.std]
        self.stem_like_markers = (default_stem_like(self.markers) if self.stem_like_markers is None
                                  else check_stem_like([str(m) for m in self.stem_like_markers],
                                                       self.markers))

    @classmethod
    def keys(cls) -> list[str]:
        """Every metadata key, in the order written."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_training(cls, meta: dict[str, Any]) -> ModelMeta:
        """From a checkpoint's metadata dict (`load_trained`): `summary` becomes
        training_summary; unknown keys are ignored."""
        try:
            values = {k: meta[k] for k in cls.keys() if meta.get(k) is not None}
            values["training_summary"] = meta.get("summary") or meta.get("training_summary") or {}
            values.setdefault("thresholds", {})
            values["histocsc_version"] = __version__
            calibration = dict(meta.get("calibration") or {})
            values["calibration"] = {"applied_in": "graph", **calibration}
            return cls(**values)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model metadata lacks markers/tile_px/mpp: {exc}") from exc

    def to_props(self) -> dict[str, str]:
        """The `metadata_props` strings."""
        return encode(**dataclasses.asdict(self))

    @classmethod
    def from_props(cls, props: dict[str, str], path: str | Path) -> ModelMeta:
        """Decode `metadata_props`; ModelError naming `path` if a required key is missing or a
        value is malformed. Unknown keys are ignored, absent optional ones take their default."""
        missing = [k for k in cls.REQUIRED if k not in props]
        if missing:
            raise ModelError(f"{path}: not a histocsc model, metadata lacks {', '.join(missing)}")
        values: dict[str, Any] = {}
        try:
            for f in dataclasses.fields(cls):
                if f.name in props:
                    values[f.name] = _decode(f, props[f.name])
            values.setdefault("histocsc_version", "")
            return cls(**values)
        except ModelError as exc:
            raise ModelError(f"{path}: {exc}") from exc
        except (ValueError, TypeError, AttributeError) as exc:
            raise ModelError(f"{path}: malformed histocsc metadata ({exc})") from exc

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(ModelMeta)}


def encode(**values: Any) -> dict[str, str]:
    """Some metadata keys as `metadata_props` strings (e.g. ``encode(precision="int8")``);
    ModelError on a key ModelMeta does not own."""
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ModelError(f"not a histocsc metadata key: {', '.join(unknown)}")
    out = {}
    for key, value in values.items():
        f = _FIELDS[key]
        if f.metadata.get("codec") == "json":
            out[key] = json.dumps(value, default=str)
        elif f.type == "float":
            out[key] = repr(float(value))
        else:
            out[key] = str(value)
    return out


def _decode(f: dataclasses.Field, text: str) -> Any:
    if f.metadata.get("codec") == "json":
        return json.loads(text)
    return {"int": int, "float": float}.get(str(f.type), str)(text)


def model_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """The `metadata_props` strings written into every exported graph, from training metadata."""
    return ModelMeta.from_training(meta).to_props()


def decode_metadata(props: dict[str, str], path: str | Path) -> dict[str, Any]:
    """Typed metadata as a dict (ModelMeta's fields); ModelError if a key is missing."""
    return ModelMeta.from_props(props, path).as_dict()


def read_model_meta(path: str | Path) -> ModelMeta:
    """The ModelMeta of an exported model file (external data is not loaded)."""
    import onnx

    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises several types for a bad file
        raise ModelError(f"{path}: not a readable ONNX model ({exc})") from exc
    return ModelMeta.from_props({p.key: p.value for p in proto.metadata_props}, path)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Decode an exported model's `metadata_props` (markers, tile_px, mpp, thresholds, ...)."""
    return read_model_meta(path).as_dict()
