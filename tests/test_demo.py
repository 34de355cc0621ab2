"""The demo runs every stage on phantom slides and the heatmaps match the planted truth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

MARKERS = ("CD133", "CD44")


@pytest.mark.slow
def test_demo_end_to_end_on_held_out_case(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = subprocess.run(  # a relative --out, as `make demo` gives
        [sys.executable, "-m", "histocsc", "demo", "--out", "demo", "--epochs", "6"],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "demo_summary.json").read_text())
    # learned on three cases, chosen on the fourth, judged on the fifth (labels from registered IHC)
    assert summary["heatmap_dice_vs_truth"], summary
    for marker in MARKERS:
        assert summary["test_auroc"][marker] >= 0.9, summary
        for case, dice in summary["heatmap_dice_vs_truth"].items():
            assert dice[marker] >= 0.7, (case, marker, dice)
    assert summary["onnx_parity_max_abs_diff"] <= 1e-4
    (heatmaps,) = [tmp_path / p for p in summary["outputs"]["heatmaps"]]
    for name in ("heatmap_CD133.png", "heatmap_CD44.png", "heatmap_stem_like.png",
                 "scores.csv", "tiles.geojson", "summary.json", "score_grid.npy"):
        assert (heatmaps / name).is_file(), name
    assert "test-case AUROC" in result.stdout
    last = result.stdout.strip().splitlines()[-1]  # the demo ends by pointing at the report
    assert last.endswith("report.html") and (tmp_path / last.split(": ")[-1]).is_file(), last
