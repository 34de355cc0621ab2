"""ModelMeta: the one owner of tensor names and metadata keys."""

from __future__ import annotations

import json

import pytest

from histocsc.errors import ModelError
from histocsc.learn import metadata
from histocsc.learn.metadata import ModelMeta, decode_metadata, encode, model_metadata


def test_round_trip_keeps_every_key_typed() -> None:
    meta = ModelMeta(markers=["CD133", "CD44"], tile_px=224, mpp=0.5,
                     thresholds={"CD133": 0.4}, encoder={"preset": "uni", "embedding_dim": 1024},
                     weights_checksum="ab" * 32, outputs=[metadata.OUTPUT, metadata.EMBEDDINGS])
    props = meta.to_props()
    assert set(props) == set(ModelMeta.keys())
    back = ModelMeta.from_props(props, "m.onnx")
    assert back == meta
    assert back.thresholds == {"CD133": 0.4, "CD44": 0.5}
    assert isinstance(back.tile_px, int) and isinstance(back.mpp, float)


def test_old_model_without_new_keys_decodes_with_defaults() -> None:
    props = {"markers": json.dumps(["CD44"]), "tile_px": "64", "mpp": "1.0"}
    out = decode_metadata(props, "old.onnx")
    assert out["precision"] == "fp32" and out["outputs"] == [metadata.OUTPUT]
    assert out["encoder"] == {} and out["weights_checksum"] == ""


def test_missing_and_malformed_keys_name_the_file() -> None:
    with pytest.raises(ModelError, match="x.onnx: not a histocsc model, metadata lacks mpp"):
        ModelMeta.from_props({"markers": "[]", "tile_px": "64"}, "x.onnx")
    with pytest.raises(ModelError, match="y.onnx: malformed"):
        ModelMeta.from_props({"markers": "[", "tile_px": "64", "mpp": "1"}, "y.onnx")


def test_encode_refuses_a_key_it_does_not_own() -> None:
    assert encode(precision="int8") == {"precision": "int8"}
    with pytest.raises(ModelError, match="not a histocsc metadata key: precison"):
        encode(precison="int8")


def test_training_meta_becomes_props() -> None:
    props = model_metadata({"markers": ["A"], "tile_px": 32, "mpp": 0.5, "summary": {"epoch": 3},
                            "calibration": {"A": {"shift": 1.0}}, "checkpoint": "ignored"})
    assert json.loads(props["training_summary"]) == {"epoch": 3}
    assert json.loads(props["calibration"]) == {"applied_in": "graph", "A": {"shift": 1.0}}
    with pytest.raises(ModelError, match="lacks markers/tile_px/mpp"):
        model_metadata({"markers": ["A"]})
