"""The feature cache: CLAM / TRIDENT HDF5 layout, resumable case by case, recomputed (and
saying why) when the encoder, the weights file or the tile store changes; heads train on it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from test_train import MARKERS, ci_config, make_prepared_cohort
from typer.testing import CliRunner

from histocsc.cli import app
from histocsc.learn.config import ModelConfig
from histocsc.learn.features import cache_cohort, embedder
from histocsc.learn.tilenet import build_encoder

KW = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
CASES = [f"case{i}" for i in range(5)]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prepared_cohort(tmp_path_factory.mktemp("prepared"), n_tiles=40)


def weights(tmp: Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    enc = build_encoder("uni", KW)
    path = tmp / f"uni{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in enc.body.state_dict().items()}, str(path))
    return path


def test_cache_layout_equals_the_encoder(cohort: Path, tmp_path: Path) -> None:
    cfg = ModelConfig(backbone="uni", backbone_kwargs=KW, weights_path=str(weights(tmp_path)))
    results = cache_cohort(cfg, cohort, tmp_path / "f", CASES, "cpu", batch=16)
    assert [r.computed for r in results] == [True] * 5
    with h5py.File(tmp_path / "f" / "case1.h5") as f:
        feats, coords = np.asarray(f["features"]), np.asarray(f["coords"])
        attrs = dict(f.attrs)
    assert feats.shape == (40, 32) and feats.dtype == np.float32 and coords.shape == (40, 2)
    with (cohort / "case1" / "labels.csv").open() as fh:
        xy = [(int(r["x"]), int(r["y"])) for r in csv.DictReader(fh)]
    assert coords.tolist() == [list(p) for p in xy]
    assert attrs["encoder"] == "uni" and attrs["tile_px"] == 32 and attrs["mpp"] == 2.0
    assert str(attrs["weights_checksum"]).startswith("sha256:") and attrs["histocsc_version"]
    enc = build_encoder("uni", KW, cfg.weights_path)
    tiles = np.load(cohort / "case1" / "tiles.npy")
    assert np.allclose(embedder(enc, cfg, torch.device("cpu"))(tiles), feats, atol=1e-5)


def test_cache_resumes_and_recomputes_saying_why(cohort: Path, tmp_path: Path) -> None:
    w = weights(tmp_path)
    out = tmp_path / "f"
    runner = CliRunner()
    base = ["features", "--data", str(cohort), "--out", str(out), "--encoder", "uni",
            "--weights", str(w), "--set", f"model.backbone_kwargs={json.dumps(KW)}",
            "--device", "cpu"]
    first = runner.invoke(app, base)
    assert first.exit_code == 0, first.output
    assert "5 case(s) computed, 0 kept" in first.output and "tiles/s" in first.output
    again = runner.invoke(app, base)
    assert "0 case(s) computed, 5 kept" in again.output, again.output

    store = cohort / "case2" / "tiles.npy"
    saved = store.read_bytes()
    tiles = np.load(store)
    tiles[0] = 255 - tiles[0]
    np.save(store, tiles)
    try:
        changed = runner.invoke(app, base)
    finally:
        store.write_bytes(saved)
    assert "case2: 40 tiles, computed (the tile store changed" in changed.output
    assert "1 case(s) computed, 4 kept" in changed.output

    other = runner.invoke(app, [*base[:6], "uni", "--weights", str(weights(tmp_path, 1)),
                                *base[9:]])
    assert "computed (the weights file changed" in other.output, other.output
    deeper = runner.invoke(app, [*base[:9], "--set",
                                 f"model.backbone_kwargs={json.dumps({**KW, 'depth': 2})}",
                                 "--device", "cpu"])
    assert deeper.exit_code == 1 and "does not fit encoder 'uni'" in deeper.output
    renorm = runner.invoke(app, [*base, "--set", "model.mean=[0.5, 0.5, 0.5]"])
    assert "computed (the encoder changed" in renorm.output, renorm.output
    assert "5 case(s) computed" in renorm.output
    assert not list(out.glob("*.tmp*")) and not list(out.glob(".*"))


def test_hub_id_as_weights_is_refused(cohort: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["features", "--data", str(cohort), "--out",
                                      str(tmp_path / "f"), "--encoder", "uni", "--weights",
                                      "MahmoodLab/UNI"])
    assert result.exit_code == 1
    assert "looks like a hub id or URL: histocsc never downloads" in result.output


def test_frozen_encoder_trains_a_head_on_the_cache(cohort: Path, tmp_path: Path) -> None:
    """With model.freeze all, train fills the cache itself, trains only the head (an epoch in
    well under a second), records that no augmentation applied, and load_trained rebuilds the
    encoder from its weights file (checked by checksum) under the trained head."""
    from histocsc.learn.model import load_trained
    from histocsc.learn.train import train

    w = weights(tmp_path)
    cfg = ci_config(cohort, tmp_path / "run", **{
        "model.backbone": "uni", "model.backbone_kwargs": KW, "model.weights_path": str(w),
        "model.freeze": "all", "model.head": "mlp", "trainer.max_epochs": 3})
    result = train(cfg)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    feats = run["data"]["features"]
    assert "no image augmentation" in feats["augmentation"]
    assert sorted(feats["computed"]) == CASES and run["weights_checksum"].startswith("sha256:")
    assert max(e["seconds"] for e in run["timings"]["train_epochs"]) < 5
    assert set(result.test) == set(MARKERS)
    model, meta = load_trained(tmp_path / "run")
    assert meta["encoder_in_checkpoint"] is False and meta["encoder"]["embedding_dim"] == 32
    x = torch.from_numpy(np.load(cohort / "case4" / "tiles.npy")[:8]).permute(0, 3, 1, 2)
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with h5py.File(Path(feats["dir"]) / "case4.h5") as f:
        cached = torch.from_numpy(np.asarray(f["features"][:8]))
    with torch.no_grad():
        z = model.embed((x.float() / 255 - mean) / std)
        assert torch.allclose(z, cached, atol=1e-5)
    # a changed weights file is refused, not silently used under the trained head
    w.write_bytes(weights(tmp_path, 2).read_bytes())
    with pytest.raises(Exception, match="the encoder weights file changed"):
        load_trained(tmp_path / "run")
