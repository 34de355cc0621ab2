"""The demo runs every stage on phantom slides and the heatmaps match the planted truth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

MARKERS = ("CD133", "CD44")


def run_demo_cli(cwd: Path, *extra: str) -> tuple[dict, str]:
    """`histocsc demo` with a relative --out, as `make demo` gives; its summary and stdout."""
    result = subprocess.run(
        [sys.executable, "-m", "histocsc", "demo", "--out", "demo", "--epochs", "6", *extra],
        capture_output=True, text=True, timeout=1200, cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((cwd / "demo" / "demo_summary.json").read_text()), result.stdout


def check_floor(summary: dict) -> None:
    """Learned on three cases, chosen on the fourth, judged on the fifth (labels from registered
    IHC): ranking, heatmap Dice against the planted truth, and calibration."""
    assert summary["heatmap_dice_vs_truth"], summary
    for marker in MARKERS:
        assert summary["test_auroc"][marker] >= 0.9, summary
        assert summary["test_ece"][marker]["after"] <= 0.05, summary
        for case, dice in summary["heatmap_dice_vs_truth"].items():
            assert dice[marker] >= 0.7, (case, marker, dice)
        for case, dice in summary["pixel_dice_vs_truth"].items():
            assert dice[marker] >= 0.6, (case, marker, dice)


@pytest.mark.slow
def test_demo_end_to_end_on_held_out_case(tmp_path: Path) -> None:
    summary, stdout = run_demo_cli(tmp_path)
    check_floor(summary)
    assert summary["onnx_parity_max_abs_diff"] <= 1e-4
    (heatmaps,) = [tmp_path / p for p in summary["outputs"]["heatmaps"]]
    for name in ("heatmap_CD133.png", "heatmap_CD44.png", "heatmap_stem_like.png",
                 "scores.csv", "tiles.geojson", "summary.json", "score_grid.npy"):
        assert (heatmaps / name).is_file(), name
    (evaluation,) = [tmp_path / p for p in summary["outputs"]["evaluation"]]
    for name in ("evaluation.json", "compare_CD133.png", "reliability_CD44.png"):
        assert (evaluation / name).is_file(), name
    assert "test-case AUROC" in stdout and "pixel level" in stdout and "ECE" in stdout
    last = stdout.strip().splitlines()[-1]  # the demo ends by pointing at the report
    assert last.endswith("report.html") and (tmp_path / last.split(": ")[-1]).is_file(), last


@pytest.mark.slow
def test_demo_keeps_its_floor_on_another_seed(tmp_path: Path) -> None:
    summary, _ = run_demo_cli(tmp_path, "--seed", "4", "--size-px", "2048")
    check_floor(summary)
