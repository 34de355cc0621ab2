"""What a split cohort can teach: a marker without labels anywhere, or with a single class in
training, is an error; a marker labelled only outside training, a split without labels for a
marker, and a cohort too small to learn from are warnings (kept in run.json, printed by train)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from histocsc.errors import LabelError

MIN_TRAIN_CASES = 3  # fewer training cases than this: figures will not hold on new patients
MIN_CLASS_TILES = 20  # fewer labelled training tiles of a class than this, per marker


def _counts(cases: list[Any], j: int) -> tuple[int, int]:
    if not cases:
        return 0, 0
    y = np.concatenate([c.labels[:, j] for c in cases])
    return int((y == 1).sum()), int((y == 0).sum())


def check_labels(root: Path, markers: list[str], cases: dict[str, list[Any]]) -> list[str]:
    """Raise LabelError for a marker nothing can be learned for; return the warnings."""
    warnings: list[str] = []
    for j, m in enumerate(markers):
        per = {s: _counts(cases[s], j) for s in ("train", "val", "test")}
        pos, neg = per["train"]
        if not any(sum(c) for c in per.values()):
            raise LabelError(
                f"{root}: marker {m} has no labelled tile in any case (no {m}_label column, no "
                f"{m} IHC, or every {m} registration flagged); prepare it, or leave it out with "
                "--set data.markers=[...]")
        if pos == 0 and neg == 0:
            where = ", ".join(f"{c.case} ({s})" for s in ("val", "test") for c in cases[s]
                              if (c.labels[:, j] >= 0).any())
            warnings.append(
                f"marker {m}: no labelled training tile (its labels are only in {where}): its "
                "output is not learned and means nothing; give it training cases or leave it "
                "out with --set data.markers=[...]")
            continue
        if pos == 0 or neg == 0:
            raise LabelError(
                f"{root}: marker {m} has {pos} positive and {neg} negative training tiles; a "
                "classifier needs both")
        if min(pos, neg) < MIN_CLASS_TILES:
            warnings.append(f"marker {m}: only {pos} positive / {neg} negative training tiles")
        if per["val"] == (0, 0):
            warnings.append(f"marker {m}: no labelled validation tile: the best checkpoint and "
                            "the calibration do not see it")
    n_train, n_val = len(cases["train"]), len(cases["val"])
    if n_train < MIN_TRAIN_CASES:
        warnings.append(
            f"the cohort is too small to learn from: {n_train} training and {n_val} validation "
            "case(s); a model needs many cases (patients) to hold on new ones, so treat this "
            "run as a smoke test")
    return warnings
