"""The built-in demo: phantom cohort -> prepare -> train -> export -> infer -> check vs truth."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from histocsc.io import write_json

DEMO_TILE_PX = 64
DEMO_TILE_MPP = 2.0  # 128 µm tiles: small enough for a tiny CNN on the CPU
DEMO_SLIDE_MPP = 1.0
DEMO_OVERLAP = 0.5  # overlapping inference: heatmap cells of 64 µm, each the mean of 4 tiles


def run_demo(
    out: Path,
    cases: int = 5,
    size_px: int = 2560,
    seed: int = 0,
    epochs: int = 8,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every stage on a fresh phantom cohort in `out`; returns (and writes) a summary."""
    from histocsc.cohort import read_cohort
    from histocsc.config import load_config, packaged_config
    from histocsc.evaluate.metrics import evaluate
    from histocsc.ihc.labels import LabelConfig
    from histocsc.ihc.registration import RegistrationConfig
    from histocsc.learn.export import export_onnx
    from histocsc.learn.model import load_trained
    from histocsc.learn.train import load_train_config, train
    from histocsc.pipeline.prepare import StageConfigs
    from histocsc.pipeline.prepare_report import run_and_report
    from histocsc.predict.blend import stride_px
    from histocsc.predict.engine import Engine, InferOptions, cpu_count, run_slides
    from histocsc.progress import progress_bar
    from histocsc.synthetic.generate import make_cohort, tiles_per_case
    from histocsc.wsi.grid import TilesConfig

    out = Path(out)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 1)
        clock = now

    say(f"1/5 phantom: {cases} cases of {size_px} px at {DEMO_SLIDE_MPP} µm/px -> {out}/phantom")
    markers = ("CD133", "CD44")
    with progress_bar("phantom", cases * tiles_per_case(size_px, len(markers))) as advance:
        cohort_csv = make_cohort(out / "phantom", cases, size_px, DEMO_SLIDE_MPP, markers, seed,
                                 advance)
    lap("phantom")

    say("2/5 prepare: tiles, IHC registration and per-tile labels for every case")
    tiles_cfg = TilesConfig(tile_px=DEMO_TILE_PX, mpp=DEMO_TILE_MPP, stride_px=DEMO_TILE_PX // 2,
                            min_tissue_fraction=0.5)
    cfgs = StageConfigs(tiles=tiles_cfg, register=load_config(RegistrationConfig),
                        label=load_config(LabelConfig))
    prepared = out / "prepared"
    run_and_report(cohort_csv, prepared, cfgs, workers=2, reuse_existing=False, command="prepare")
    lap("prepare")

    say("3/5 train: tiny CNN on the labelled tiles (split by case)")
    cfg = load_train_config(packaged_config("train-ci.yaml"), {
        "data.root": str(prepared), "out": str(out / "run"), "seed": seed,
        "model.backbone": "tiny", "trainer.max_epochs": epochs, "trainer.accelerator": "cpu",
    })
    result = train(cfg, run_dir=out / "run")
    lap("train")

    say("4/5 export: ONNX with preprocessing inside, parity checked against PyTorch")
    model, meta = load_trained(result.run_dir)
    exported = export_onnx(model, meta, out / "model.onnx")
    lap("export")

    say("5/5 infer: heatmaps, scores.csv, tiles.geojson and summary.json for the test case(s)")
    cohort_cases = read_cohort(cohort_csv).cases
    test_cases = [c for c in cohort_cases if c.split == "test"] or cohort_cases[-1:]
    slides = [c.he for c in test_cases]
    engine = Engine(out / "model.onnx", device="auto")
    say(engine.describe())
    options = InferOptions(batch=64, workers=cpu_count(), slide_mpp=None,
                           stride_px=stride_px(engine.tile_px, DEMO_OVERLAP))
    report = run_slides(engine, slides, out / "infer", options, say=say, force=True,
                        progress=lambda name, total: progress_bar(name, total))
    lap("infer")
    if report.failed:
        from histocsc.errors import HistocscError

        raise HistocscError(f"demo: inference failed: {report.failed}")

    evaluations = {c.case: evaluate(out / "infer" / c.he.stem, out / "phantom" / c.case,
                                    out / "evaluate" / c.case) for c in test_cases}
    summary = {
        "cases": cases,
        "size_px": size_px,
        "overlap": DEMO_OVERLAP,
        "test_auroc": {m: round(v["auroc"], 3) for m, v in result.test.items()},
        "test_ece": {m: {"before": round(v["ece_uncalibrated"], 4), "after": round(v["ece"], 4)}
                     for m, v in result.test.items()},
        "heatmap_dice_vs_truth": figure(evaluations, "tile", "dice"),
        "pixel_dice_vs_truth": figure(evaluations, "pixel", "dice"),
        "onnx_parity_max_abs_diff": exported.max_abs_diff,
        "timings_s": timings,
        "outputs": {
            "phantom_cohort": str(cohort_csv),
            "prepared": str(prepared),
            "run": str(result.run_dir),
            "model": str(out / "model.onnx"),
            "heatmaps": [str(out / "infer" / s.stem) for s in slides],
            "evaluation": [str(out / "evaluate" / c.case) for c in test_cases],
            "reports": [str(out / "infer" / s.stem / "report.html") for s in slides],
        },
    }
    write_json(out / "demo_summary.json", summary)
    return summary


def figure(evaluations: dict[str, dict[str, Any]], level: str, key: str
           ) -> dict[str, dict[str, float]]:
    """{case: {marker: value}} of one figure of `histocsc evaluate` results (3 decimals)."""
    return {case: {m: round(float(row[level][key]), 3) for m, row in ev["markers"].items()}
            for case, ev in evaluations.items()}
