"""Training: learns planted marker signals, resumes, and rejects bad configurations."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from histocsc.errors import ConfigError, HistocscError, LabelError, ModelError
from histocsc.learn.model import load_trained
from histocsc.learn.train import TrainConfig, load_train_config, train

MARKERS = ["CD133", "CD44"]
TILE = 32


def _tile(rng: np.random.Generator, cd133: bool, cd44: bool) -> np.ndarray:
    """A pink tile with purple nuclei; CD133+ has big dark nuclei, CD44+ a coarse texture."""
    img = np.empty((TILE, TILE, 3), np.float32)
    img[:] = (225, 170, 195)
    img += rng.normal(0, 8, img.shape)
    yy, xx = np.mgrid[:TILE, :TILE]
    n_nuclei = rng.integers(3, 7)
    radius = 4.5 if cd133 else 2.0
    for _ in range(n_nuclei):
        cy, cx = rng.uniform(0, TILE, 2)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        img[inside] = (90, 60, 140) if cd133 else (150, 110, 170)
    if cd44:
        stripes = ((yy // 3 + xx // 3) % 2).astype(np.float32)[..., None]
        img -= 40 * stripes
    return np.clip(img, 0, 255).astype(np.uint8)


def make_prepared_cohort(root: Path, n_tiles: int = 120, seed: int = 0) -> Path:
    """A tiny prepared cohort in the agreed layout: 3 train, 1 val, 1 test case."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    splits = ["train", "train", "train", "val", "test"]
    with (root / "cohort.csv").open("w") as f:
        f.write("case,he,CD133,CD44,split\n")
        for i, split in enumerate(splits):
            f.write(f"case{i},he{i}.tif,cd133_{i}.tif,cd44_{i}.tif,{split}\n")
    for i in range(len(splits)):
        case = root / f"case{i}"
        case.mkdir(exist_ok=True)
        pos = rng.random((n_tiles, 2)) < (0.3, 0.4)
        tiles = np.stack([_tile(rng, a, b) for a, b in pos])
        np.save(case / "tiles.npy", tiles)
        (case / "grid.json").write_text(
            json.dumps({"slide_path": str(root / f"he{i}.tif"), "mpp": 2.0, "tile_px": TILE})
        )
        ignored = rng.random((n_tiles, 2)) < 0.05
        with (case / "labels.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                ["x", "y", "w", "h", "tissue_fraction"]
                + [f"{m}_{k}" for m in MARKERS for k in ("fraction", "label")]
            )
            for t in range(n_tiles):
                row = [t * 64, 0, 64, 64, 1.0]
                for j in range(2):
                    label = -1 if ignored[t, j] else int(pos[t, j])
                    row += [float(pos[t, j]), label]
                w.writerow(row)
    return root


def phantom_prepared(root: Path, seed: int = 0) -> Path:
    """5 small phantom cases (3 train, 1 val, 1 test), tiled with histocsc.wsi (64 px tiles at
    2 µm/px, half-overlapping), labelled from the phantom's truth masks, in the prepared layout."""
    from histocsc.synthetic.generate import make_cohort
    from histocsc.synthetic.truth_prep import prepare_from_truth
    from histocsc.wsi.grid import TilesConfig

    make_cohort(root / "phantom", 5, size_px=2048, mpp=1.0, seed=seed)
    cfg = TilesConfig(tile_px=64, mpp=2.0, stride_px=32, min_tissue_fraction=0.5)
    return prepare_from_truth(root / "phantom", root / "prepared", cfg)


def ci_config(data: Path, out: Path, **overrides: object) -> TrainConfig:
    base = {
        "out": str(out),
        "data.root": str(data),
        "trainer.progress_bar": False,
    }
    base.update(overrides)
    return load_train_config(Path(__file__).parents[1] / "configs" / "train-ci.yaml", base)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prepared_cohort(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return phantom_prepared(tmp_path_factory.mktemp("phantom"))


@pytest.mark.slow
def test_learns_every_marker_on_held_out_phantom_case(phantom: Path, tmp_path: Path) -> None:
    data = phantom
    result = train(ci_config(data, tmp_path / "run"))
    assert set(result.test) == set(MARKERS)
    run = tmp_path / "run"
    for name in (
        "config.yaml",
        "run.json",
        "test_metrics.json",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        "logs/metrics.csv",
    ):
        assert (run / name).is_file(), name
    meta = json.loads((run / "run.json").read_text())
    assert meta["data"]["train"]["cases"] == ["case000", "case001", "case002"]
    assert meta["data"]["val"]["cases"] == ["case003"]
    assert meta["data"]["test"]["cases"] == ["case004"]
    assert meta["test"]["CD44"]["auroc"] == result.test["CD44"]["auroc"]
    model, info = load_trained(run)
    assert info["markers"] == MARKERS and info["tile_px"] == 64 and info["mpp"] == 2.0
    assert info["backbone"] == "tiny" and set(info["thresholds"]) == set(MARKERS)
    assert info["summary"]["test"]["CD133"]["auroc"] == result.test["CD133"]["auroc"]
    assert not model.training
    # the reloaded model reproduces the test AUROC from the tile store
    import torch
    from torchmetrics.functional.classification import binary_auroc

    tiles = np.load(data / "case004" / "tiles.npy")
    with (data / "case004" / "labels.csv").open() as f:
        labels = np.array([[int(r[f"{m}_label"]) for m in MARKERS] for r in csv.DictReader(f)])
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(info["mean"]).view(1, 3, 1, 1)) / torch.tensor(info["std"]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        probs = torch.sigmoid(model(x))
    for j, marker in enumerate(MARKERS):
        keep = labels[:, j] >= 0
        auroc = binary_auroc(probs[keep, j], torch.from_numpy(labels[keep, j]))
        assert abs(float(auroc) - result.test[marker]["auroc"]) < 1e-4
    # AUROC >= 0.9 for every marker on the held-out case, over ALL its labelled tiles. The
    # phantom draws each marker's own H&E signature from that marker's field (CD133: crowded,
    # large, round, hyperchromatic nuclei; CD44: vesicular nuclei with a prominent nucleolus and
    # a perinuclear halo), so tiles positive for one marker and negative for the other are
    # learnable and are kept: no cross-marker tiles are dropped from the evaluation.
    cd133, cd44 = labels[:, 0], labels[:, 1]
    assert ((cd44 == 1) & (cd133 == 0)).sum() >= 5, "held-out case lacks CD44-only tiles"
    for j, marker in enumerate(MARKERS):
        keep = labels[:, j] >= 0
        auroc = float(binary_auroc(probs[keep, j], torch.from_numpy(labels[keep, j])))
        assert auroc >= 0.9, (marker, auroc, result.test)


def test_resume_continues_epochs(cohort: Path, tmp_path: Path) -> None:
    first = train(ci_config(cohort, tmp_path / "run", **{"trainer.max_epochs": 1}))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert first.epochs == 1
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    second = train(ci_config(cohort, tmp_path / "run", **{"trainer.max_epochs": 2}), resume=last)
    assert second.epochs == 2
    with (tmp_path / "run" / "logs" / "metrics.csv").open() as f:
        epochs = {row["epoch"] for row in csv.DictReader(f) if row.get("val/auroc_mean")}
    assert epochs == {"0", "1"}
    model, meta = load_trained(last)  # a .ckpt file works as well as a run folder
    assert meta["summary"]["epoch"] == 1 and meta["markers"] == MARKERS


def test_load_trained_rejects_what_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="checkpoint not found"):
        load_trained(tmp_path / "missing.ckpt")
    with pytest.raises(ModelError, match="no checkpoints/best.ckpt"):
        load_trained(tmp_path)
    import torch

    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ModelError, match="not a histocsc training checkpoint"):
        load_trained(tmp_path / "other.ckpt")


def test_pretrained_weights_come_from_a_local_file(tmp_path: Path) -> None:
    import torch

    from histocsc.learn.model import TinyCNN, build_model

    source = TinyCNN(1000)  # e.g. an ImageNet-style head: replaced, the body is kept
    torch.save(source.state_dict(), tmp_path / "tiny.pth")
    model = build_model("tiny", 2, tmp_path / "tiny.pth")
    assert model.fc.out_features == 2
    assert torch.equal(model.features[0].weight, source.features[0].weight)
    with pytest.raises(ModelError, match="do not fit backbone 'resnet18'"):
        build_model("resnet18", 2, tmp_path / "tiny.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="junk.pth: not a readable"):
        build_model("tiny", 2, tmp_path / "junk.pth")


def test_unknown_backbone_is_a_config_error(cohort: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown backbone 'resnet9000'"):
        ci_config(cohort, tmp_path, **{"model.backbone": "resnet9000"})


def test_missing_weights_file_is_a_model_error(cohort: Path, tmp_path: Path) -> None:
    cfg = ci_config(cohort, tmp_path, **{"model.weights_path": str(tmp_path / "none.pth")})
    with pytest.raises(ModelError, match="none.pth: weights file not found"):
        train(cfg)


def test_marker_without_labels_is_a_label_error(cohort: Path, tmp_path: Path) -> None:
    with pytest.raises(HistocscError, match="CD999"):
        train(ci_config(cohort, tmp_path, **{"data.markers": ["CD999"]}))
    data = make_prepared_cohort(tmp_path / "nolabels", n_tiles=8)
    for case in data.glob("case*/labels.csv"):
        text = case.read_text().replace("CD44_label", "CD44_other")
        case.write_text(text)
    with pytest.raises(LabelError, match="CD44_label"):
        train(ci_config(data, tmp_path / "run"))
    # labelled, but never positive in the training cases
    data = make_prepared_cohort(tmp_path / "nopositive", n_tiles=8)
    for case in data.glob("case*/labels.csv"):
        rows = list(csv.reader(case.open()))
        col = rows[0].index("CD133_label")
        for row in rows[1:]:
            row[col] = "0"
        with case.open("w", newline="") as f:
            csv.writer(f).writerows(rows)
    with pytest.raises(LabelError, match="marker CD133 has 0 positive"):
        train(ci_config(data, tmp_path / "run"))


def test_augmentation_is_train_only_and_keeps_tiles_valid() -> None:
    from histocsc.learn.augment import AugmentConfig, HEDJitter, build_augment

    cfg = AugmentConfig()
    assert build_augment(cfg, train=False) is None
    assert build_augment(cfg.model_copy(update={"enabled": False})) is None
    rng = np.random.default_rng(1)
    tile = _tile(rng, True, False)
    out = build_augment(cfg.model_copy(update={"stain_p": 1.0}))(image=tile)["image"]
    assert out.shape == tile.shape and out.dtype == np.uint8
    same = HEDJitter(scale=(1, 1), shift=(0, 0), p=1.0)(image=tile)["image"]
    assert np.abs(same.astype(int) - tile).max() <= 1  # identity when nothing is jittered
    more_h = HEDJitter(scale=(1.5, 1.5), shift=(0, 0), p=1.0)(image=tile)["image"]
    assert more_h.mean() < tile.mean()  # more stain is darker
    hestain = AugmentConfig(stain_method="random_preset", stain_p=1.0)
    assert build_augment(hestain)(image=tile)["image"].shape == tile.shape


def test_tiles_from_slides_match_the_tile_store(phantom: Path) -> None:
    from histocsc.learn.data import DataConfig, TileDataModule

    def first_tiles(source: str) -> np.ndarray:
        dm = TileDataModule(DataConfig(root=str(phantom), source=source, num_workers=0))
        dm.setup()
        ds = dm.datasets["test"]
        return np.stack([ds.read_tile(i) for i in range(0, len(ds), 17)])

    store, slide = first_tiles("store"), first_tiles("slide")
    assert store.shape == slide.shape and store.shape[1:] == (64, 64, 3)
    assert np.abs(store.astype(int) - slide).mean() < 2.0


def test_split_is_by_case_seeded_and_stratified(cohort: Path, tmp_path: Path) -> None:
    from histocsc.learn.data import DataConfig, TileDataModule

    data = tmp_path / "nosplit"
    shutil.copytree(cohort, data)
    lines = (data / "cohort.csv").read_text().splitlines()
    rows = [line.rsplit(",", 1)[0] + "," for line in lines[1:]]  # empty split column
    (data / "cohort.csv").write_text("\n".join([lines[0], *rows]) + "\n")

    def splits(seed: int) -> dict[str, list[str]]:
        dm = TileDataModule(DataConfig(root=str(data), num_workers=0), seed=seed)
        dm.setup()
        return {s: [c.case for c in dm.cases[s]] for s in ("train", "val", "test")}

    first = splits(0)
    assert first == splits(0)
    assert len(first["val"]) == 1 and len(first["test"]) == 1 and len(first["train"]) == 3
    assert sorted(sum(first.values(), [])) == [f"case{i}" for i in range(5)]
    assert any(splits(seed) != first for seed in range(1, 8))


def test_failed_registration_qc_masks_that_marker(cohort: Path, tmp_path: Path) -> None:
    from histocsc.learn.data import DataConfig, TileDataModule

    data = tmp_path / "qc"
    shutil.copytree(cohort, data)
    (data / "case0" / "qc.json").write_text(
        json.dumps(
            {
                "registration_ok": False,
                "markers": {"CD133": {"registration_ok": False}, "CD44": {"registration_ok": True}},
            }
        )
    )
    (data / "case1" / "qc.json").write_text(json.dumps({"registration_ok": False}))
    dm = TileDataModule(DataConfig(root=str(data), num_workers=0))
    dm.setup()
    summary = dm.summary()
    assert summary["train"]["cases"] == ["case0", "case2"]
    assert summary["skipped_cases"] == ["case1: registration QC failed"]
    case0 = dm.cases["train"][0]
    assert (case0.labels[:, 0] == -1).all() and (case0.labels[:, 1] >= 0).any()


def test_cli_trains_and_reports_bad_config_in_one_line(cohort: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from histocsc.cli import app

    config = str(Path(__file__).parents[1] / "configs" / "train-ci.yaml")
    runner = CliRunner()
    bad = runner.invoke(
        app,
        ["train", "--config", config, "--data", str(cohort), "--set", "model.backbone=resnet9000"],
    )
    assert bad.exit_code == 1
    assert "error:" in bad.output and "unknown backbone 'resnet9000'" in bad.output
    assert "Traceback" not in bad.output
    out = tmp_path / "run"
    ok = runner.invoke(
        app,
        [
            "train",
            "--config",
            config,
            "--data",
            str(cohort),
            "--out",
            str(out),
            "--set",
            "trainer.max_epochs=1",
            "--set",
            "trainer.progress_bar=false",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert "test CD133: AUROC" in ok.output
    assert (out / "checkpoints" / "best.ckpt").is_file()


def test_metrics_survive_a_marker_with_every_tile_ignored() -> None:
    """A test case whose CD44 registration was flagged has every CD44 label -1: training must
    still report CD133 (it used to fail in torchmetrics after the last epoch) and NaN for CD44."""
    import math

    import torch

    from histocsc.learn.module import MarkerMetrics

    metrics = MarkerMetrics(["CD133", "CD44"])
    probs = torch.tensor([[0.1, 0.5], [0.4, 0.5], [0.35, 0.5], [0.8, 0.5], [0.9, 0.5]])
    target = torch.tensor([[0, -1], [0, -1], [1, -1], [1, -1], [-1, -1]], dtype=torch.int8)
    metrics.update(torch.logit(probs), target)
    out = metrics.compute()
    assert out["CD133"]["auroc"] == pytest.approx(0.75)  # 3 of the 4 pairs ranked right
    assert out["CD133"]["positive"] == 2 and out["CD133"]["negative"] == 2
    assert math.isnan(out["CD44"]["auroc"]) and out["CD44"]["positive"] == 0


def test_checkpoint_before_calibration_holds_the_documented_threshold(cohort: Path,
                                                                      tmp_path: Path) -> None:
    """An interrupted run's last.ckpt (fit done, calibration not) carries the rule's 0.5, not a
    per-marker Youden cut of the validation tiles."""
    import lightning as L
    import torch

    from histocsc.learn.data import TileDataModule
    from histocsc.learn.model import META_KEY
    from histocsc.learn.train import build_module, build_trainer

    cfg = ci_config(cohort, tmp_path / "run", **{"trainer.max_epochs": 2})
    L.seed_everything(0)
    data = TileDataModule(cfg.data, seed=0)
    data.setup("fit")
    module = build_module(cfg, data, on_gpu=False)
    trainer, _, _ = build_trainer(cfg, tmp_path / "run", "32-true")
    trainer.fit(module, datamodule=data)
    meta = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)[META_KEY]
    assert meta["thresholds"] == {m: 0.5 for m in MARKERS}
    assert all("threshold" not in row for row in meta["summary"]["val"].values())
    assert meta["summary"]["val"]["CD133"]["auroc"] > 0.5
