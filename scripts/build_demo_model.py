"""Rebuild the built-in model with the project's own pipeline, and its model card.

    python scripts/build_demo_model.py           # rebuild; write the model, card JSON and card
    python scripts/build_demo_model.py --check   # rebuild into the work folder only and compare
                                                 # its metrics with the shipped card (±0.02)

Steps (fixed seeds): a phantom cohort (`histocsc phantom`), `prepare` (tiles, IHC
registration, DAB labels), `train` (the tiny CNN on the CPU), `export` (ONNX, parity checked),
then held-out phantom cohorts made with other seeds, labelled from their truth masks, scored by
the exported ONNX model. Writes `histocsc/models/histocsc-phantom-tiny.onnx` (package data),
`histocsc/models/histocsc-phantom-tiny.card.json` and `models/MODEL_CARD.md`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from histocsc import __version__  # noqa: E402
from histocsc.io import file_checksum, read_json, write_json  # noqa: E402
from histocsc.models import BUILTIN_CARD, BUILTIN_ONNX, NOTICE  # noqa: E402
from histocsc.pipeline.demo import DEMO_SLIDE_MPP, DEMO_TILE_MPP, DEMO_TILE_PX  # noqa: E402

SEED = 0
MARKERS = ("CD133", "CD44")
TRAIN_CASES = 6  # 4 train, 1 val, 1 test (the phantom's fixed split)
SIZE_PX = 2560
EPOCHS = 10
HELDOUT_SEEDS = (1001, 2002, 3003)  # seeds no test uses
HELDOUT_CASES = 2
TOLERANCE = 0.02
WORK = Path("runs") / "build-demo-model"  # relative: the run folder recorded in the model
MODEL_DIR = ROOT / "histocsc" / "models"
CARD_MD = ROOT / "models" / "MODEL_CARD.md"


def tiles_config() -> Any:
    from histocsc.wsi.grid import TilesConfig

    return TilesConfig(tile_px=DEMO_TILE_PX, mpp=DEMO_TILE_MPP, stride_px=DEMO_TILE_PX // 2,
                       min_tissue_fraction=0.5)


def train_model(work: Path) -> tuple[Path, dict[str, Any]]:
    """Phantom -> prepare -> train -> export; returns the ONNX path and the run.json."""
    from histocsc.config import load_config
    from histocsc.ihc.labels import LabelConfig
    from histocsc.ihc.registration import RegistrationConfig
    from histocsc.learn.export import export_onnx
    from histocsc.learn.model import load_trained
    from histocsc.learn.train import load_train_config, train
    from histocsc.pipeline.prepare import StageConfigs, run_and_report
    from histocsc.synthetic.generate import make_cohort

    cohort = work / "phantom" / "cohort.csv"
    if not cohort.is_file():  # the phantom is a pure function of its seed: made once
        make_cohort(work / "phantom", TRAIN_CASES, SIZE_PX, DEMO_SLIDE_MPP, MARKERS, SEED)
    cfgs = StageConfigs(tiles=tiles_config(), register=load_config(RegistrationConfig),
                        label=load_config(LabelConfig))
    run_and_report(cohort, work / "prepared", cfgs, workers=2, reuse_existing=False,
                   command="prepare")
    cfg = load_train_config(ROOT / "configs" / "train-ci.yaml", {
        "data.root": str(work / "prepared"), "out": str(work / "run"), "seed": SEED,
        "model.backbone": "tiny", "trainer.max_epochs": EPOCHS, "trainer.accelerator": "cpu",
        "trainer.deterministic": True, "trainer.progress_bar": False,
    })
    result = train(cfg, run_dir=work / "run")
    model, meta = load_trained(result.run_dir)
    onnx_path = work / BUILTIN_ONNX
    export_onnx(model, meta, onnx_path)
    return onnx_path, read_json(result.run_dir / "run.json")


def heldout_metrics(onnx_path: Path, work: Path) -> dict[str, Any]:
    """AUROC, AP, sensitivity and specificity at the model's threshold, per marker, on tiles of
    fresh phantom cohorts labelled from their truth masks: one figure per seed, then the spread."""
    import torch
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision

    from histocsc.cohort import read_cohort
    from histocsc.predict.engine import Engine
    from histocsc.synthetic.generate import case_name, make_cohort
    from histocsc.synthetic.truth_prep import prepare_from_truth

    engine = Engine(onnx_path, device="cpu")
    per_seed: dict[str, dict[str, list[float]]] = {m: {} for m in engine.markers}
    tiles_total = 0
    for seed in HELDOUT_SEEDS:
        phantom = work / f"heldout-{seed}"
        prepared = work / f"heldout-{seed}-tiles"
        if not (prepared / case_name(HELDOUT_CASES - 1) / "labels.csv").is_file():  # written last
            make_cohort(phantom, HELDOUT_CASES, SIZE_PX, DEMO_SLIDE_MPP, MARKERS, seed)
            prepare_from_truth(phantom, prepared, tiles_config())
        probs, labels = [], []
        for case in read_cohort(phantom / "cohort.csv").cases:
            tiles = np.load(prepared / case.case / "tiles.npy")
            probs.append(np.concatenate([engine.predict(tiles[i:i + 64])
                                         for i in range(0, len(tiles), 64)]))
            table = np.genfromtxt(prepared / case.case / "labels.csv", delimiter=",", names=True)
            labels.append(np.stack([table[f"{m}_fraction"] for m in engine.markers], 1))
        p, frac = np.concatenate(probs), np.concatenate(labels)
        tiles_total += len(p)
        for j, m in enumerate(engine.markers):
            pt, yt = torch.from_numpy(p[:, j]), torch.from_numpy(frac[:, j] >= 0.5).long()
            clear = (frac[:, j] >= 0.5) | (frac[:, j] <= 0.05)
            call = pt >= engine.meta["thresholds"][m]
            row = {
                "auroc": float(binary_auroc(pt, yt)),
                "ap": float(binary_average_precision(pt, yt)),
                "sensitivity": float(call[yt == 1].float().mean()),
                "specificity": float((~call[yt == 0]).float().mean()),
                "auroc_clear": float(binary_auroc(pt[clear], yt[clear])),
                "prevalence": float(yt.float().mean()),
            }
            for k, v in row.items():
                per_seed[m].setdefault(k, []).append(round(v, 4))
    spread = {m: {k: {"mean": round(float(np.mean(v)), 3), "min": round(min(v), 3),
                      "max": round(max(v), 3), "per_seed": v} for k, v in rows.items()}
              for m, rows in per_seed.items()}
    return {"seeds": list(HELDOUT_SEEDS), "cases_per_seed": HELDOUT_CASES, "size_px": SIZE_PX,
            "tiles": tiles_total, "labels": "every tile; positive when at least 50 % of it "
            "lies in the marker's truth mask (auroc_clear: only tiles >= 50 % or <= 5 %)",
            "markers": spread}


def card_facts(onnx_path: Path, run: dict[str, Any], heldout: dict[str, Any]) -> dict[str, Any]:
    """Everything the card states, as data (the report and the tests read it)."""
    from histocsc.learn.metadata import read_metadata

    meta = read_metadata(onnx_path)
    data = run["data"]
    return {
        "name": "histocsc-phantom-tiny",
        "file": BUILTIN_ONNX,
        "checksum": file_checksum(onnx_path),
        "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        "size_bytes": onnx_path.stat().st_size,
        "intended_use": NOTICE,
        "markers": meta["markers"],
        "tile_px": meta["tile_px"],
        "mpp": meta["mpp"],
        "thresholds": {m: round(v, 4) for m, v in meta["thresholds"].items()},
        "calibration": {k: v for k, v in meta.items() if "temperature" in k or "calib" in k},
        "backbone": meta["backbone"],
        "histocsc_version": __version__,
        "training": {
            "seed": SEED, "cases": TRAIN_CASES, "size_px": SIZE_PX, "slide_mpp": DEMO_SLIDE_MPP,
            "epochs": EPOCHS, "epochs_run": run.get("epochs_run"),
            "tiles": {s: data[s]["tiles"] for s in ("train", "val", "test")},
            "cases_per_split": {s: data[s]["cases"] for s in ("train", "val", "test")},
            "labels": "registered phantom IHC (DAB fraction per tile), as `histocsc prepare`",
        },
        "test_split": {m: {k: round(float(v[k]), 3) for k in ("auroc", "ap")}
                       for m, v in run["test"].items()},
        "heldout": heldout,
    }


def write_card_md(facts: dict[str, Any], path: Path) -> None:
    """Render the card for people."""
    tr, ho = facts["training"], facts["heldout"]
    rows = []
    for m in facts["markers"]:
        h = ho["markers"][m]
        cells = [f"{h[k]['mean']:.3f} ({h[k]['min']:.3f}-{h[k]['max']:.3f})" for k in
                 ("auroc", "ap", "sensitivity", "specificity", "auroc_clear")]
        rows.append(f"| {m} | {facts['thresholds'][m]:.3f} | "
                    f"{facts['test_split'][m]['auroc']:.3f} | " + " | ".join(cells) + " |")
    calib = (f"`{json.dumps(facts['calibration'], sort_keys=True)}`" if facts["calibration"]
             else "none recorded in the model metadata")
    tiles = ", ".join(f"{n} {s}" for s, n in tr["tiles"].items())
    text = f"""# Model card: {facts['name']} (the built-in model)

**Intended use: {facts['intended_use']}.**

It exists so that `histocsc infer SLIDE` works out of the box and so that the outputs and the
report can be seen; its scores on a real slide mean nothing about CD133 or CD44.

| fact | value |
|---|---|
| file (package data) | `histocsc/models/{facts['file']}` ({facts['size_bytes']:,} bytes) |
| SHA-256 | `{facts['sha256']}` |
| histocsc checksum | `{facts['checksum']}` |
| markers | {', '.join(facts['markers'])} |
| tile size | {facts['tile_px']} px |
| mpp | {facts['mpp']:g} µm/px ({facts['tile_px'] * facts['mpp']:g} µm tiles) |
| thresholds | {', '.join(f'{m} {v:.3f}' for m, v in facts['thresholds'].items())} |
| calibration | {calib} |
| architecture | `{facts['backbone']}` CNN (4 conv blocks, ~100 k parameters) |
| histocsc version | {facts['histocsc_version']} |

## Training data and procedure

Made by `python scripts/build_demo_model.py` with the project's own commands, seed
{tr['seed']}: `histocsc phantom` wrote {tr['cases']} synthetic cases ({tr['size_px']} px
square at {tr['slide_mpp']:g} µm/px; H&E plus CD133 and CD44 IHC); `histocsc prepare` tiled
them ({facts['tile_px']} px at {facts['mpp']:g} µm/px, stride half a tile), registered each IHC
onto its H&E and turned the DAB into per-tile labels; `histocsc train` fitted the tiny CNN on
the CPU ({tr['epochs']} epochs, cases {', '.join(tr['cases_per_split']['train'])} for
training, {', '.join(tr['cases_per_split']['val'])} to choose the epoch and the thresholds
(Youden), {', '.join(tr['cases_per_split']['test'])} as the test split; tiles: {tiles});
`histocsc export` wrote the ONNX graph (uint8 tiles in, probabilities out) and checked it
against PyTorch.

## Metrics on held-out phantom cases

Test-split AUROC (labels from the registered IHC of case
{', '.join(tr['cases_per_split']['test'])}) and, on {len(ho['seeds'])} fresh phantom cohorts
of {ho['cases_per_seed']} cases each (seeds {', '.join(map(str, ho['seeds']))}, used by no
test; {ho['tiles']} tiles; labels from the truth masks: {ho['labels']}), the mean and (min-max)
over the seeds. Sensitivity and specificity are at the model's threshold; clear AUROC leaves
out the tiles only partly in a mask (5-50 %).

| marker | threshold | test AUROC | held-out AUROC | AP | sensitivity | specificity | clear AUROC |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

`python scripts/build_demo_model.py --check` rebuilds the model and fails if any of these
figures moves by more than {TOLERANCE}.

## Limits

- It has only seen phantom slides: drawn cells with a planted morphology for each marker
  (see [docs/phantom.md](../docs/phantom.md)). It has **never seen real CD133 / CD44 IHC** nor
  a real H&E; on a real slide its map shows where real tissue happens to resemble the planted
  patterns, not where stem-like cells are.
- Tiles of {facts['tile_px'] * facts['mpp']:g} µm: it cannot resolve single cells.
- No stain normalisation beyond the training's stain jitter; no calibration across sites.
- A model for real use has to be trained on real paired H&E / IHC
  ([docs/researcher.md](../docs/researcher.md)) and validated by pathologists.
"""
    path.write_text(text, encoding="utf-8")


def compare(new: dict[str, Any], shipped: dict[str, Any]) -> tuple[list[str], float]:
    """Figures of `new` that differ from `shipped` by more than TOLERANCE, and the largest
    difference of any figure."""
    pairs = []
    for m in shipped["markers"]:
        for k in ("auroc", "ap"):
            pairs.append((f"test {m} {k}", new["test_split"][m][k], shipped["test_split"][m][k]))
        for k, row in shipped["heldout"]["markers"][m].items():
            pairs.append((f"held-out {m} {k}", new["heldout"]["markers"][m][k]["mean"],
                          row["mean"]))
    bad = [f"{name}: {a:.3f} vs card {b:.3f}" for name, a, b in pairs if abs(a - b) > TOLERANCE]
    return bad, max(abs(a - b) for _, a, b in pairs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="rebuild and compare with the shipped card; change nothing")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the phantom cohorts and prepared tiles of a kept work folder")
    args = parser.parse_args()
    os.chdir(ROOT)
    shutil.rmtree(WORK if not args.reuse else WORK / "run", ignore_errors=True)
    t0 = time.perf_counter()
    onnx_path, run = train_model(WORK)
    heldout = heldout_metrics(onnx_path, WORK)
    facts = card_facts(onnx_path, run, heldout)
    write_json(WORK / BUILTIN_CARD, facts)
    print(f"built {onnx_path} in {time.perf_counter() - t0:.0f} s; sha256 {facts['sha256']}")
    for m in facts["markers"]:
        h = facts["heldout"]["markers"][m]
        print(f"{m}: test AUROC {facts['test_split'][m]['auroc']:.3f}; held-out AUROC "
              f"{h['auroc']['mean']:.3f} ({h['auroc']['min']:.3f}-{h['auroc']['max']:.3f}), "
              f"AP {h['ap']['mean']:.3f}")
    status = 0
    if args.check:
        shipped = read_json(MODEL_DIR / BUILTIN_CARD)
        bad, largest = compare(facts, shipped)
        same = facts["sha256"] == shipped["sha256"]
        print(f"same bytes as the shipped model: {'yes' if same else 'no'}; largest difference "
              f"of a card figure: {largest:.4f}")
        print("\n".join(bad) if bad else f"every card figure reproduced within ±{TOLERANCE}")
        status = 1 if bad else 0
    else:
        shutil.copyfile(onnx_path, MODEL_DIR / BUILTIN_ONNX)
        write_json(MODEL_DIR / BUILTIN_CARD, facts)
        write_card_md(facts, CARD_MD)
        print(f"wrote {MODEL_DIR / BUILTIN_ONNX}, {MODEL_DIR / BUILTIN_CARD} and {CARD_MD}")
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
