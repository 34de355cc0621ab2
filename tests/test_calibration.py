"""Calibration: temperature recovered, threshold rule, ECE, and the exported graph applies it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from histocsc.learn.calibration import (
    DEFAULT_THRESHOLD,
    calibration_report,
    ece,
    fit_calibration,
    fit_scaling,
)
from histocsc.learn.export import export_onnx, read_metadata
from histocsc.learn.model import build_model


def overconfident(n: int, temperature: float, prior: float, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from sigmoid(z), logits reported as z * temperature (overconfident)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g) * 2.0 + math.log(prior / (1 - prior))
    y = (torch.rand(n, generator=g) < torch.sigmoid(z)).to(torch.int8)
    return z * temperature, y


def test_temperature_is_recovered_and_ece_drops() -> None:
    logits, target = overconfident(20000, temperature=3.0, prior=0.3)
    t, shift = fit_scaling(logits, target)
    assert t == pytest.approx(3.0, rel=0.08) and abs(shift) < 0.3
    before = ece(torch.sigmoid(logits), target)
    after = ece(torch.sigmoid(logits / t), target)
    assert before > 0.05 and after < 0.02
    assert fit_scaling(logits, torch.zeros_like(target)) == (1.0, 0.0)  # one class: left alone


def test_a_shift_of_the_logits_is_fitted_and_removed() -> None:
    # e.g. a model trained with pos_weight w reports logit + log(w)
    logits, target = overconfident(20000, temperature=1.0, prior=0.1, seed=1)
    w = 9.0
    cal = fit_calibration(["M"], (logits + math.log(w))[:, None], target[:, None])["M"]
    assert cal.shift == pytest.approx(math.log(w), rel=0.1)
    assert cal.temperature == pytest.approx(1, rel=0.1)
    report = calibration_report({"M": cal}, (logits + math.log(w))[:, None], target[:, None])
    assert report["M"]["ece"] < 0.02 < report["M"]["ece_uncalibrated"]


def test_threshold_is_the_calibrated_half_whatever_the_validation_gap() -> None:
    # separable validation with a wide gap: an F1-best cut could sit anywhere in it (the old
    # rule gave its logit middle, ~0.05 here); the calibrated 0.5 does not follow the gap
    logits = torch.cat([torch.linspace(1, 6, 100), torch.linspace(-9, -5, 400)])[:, None]
    target = torch.cat([torch.ones(100), torch.zeros(400)]).to(torch.int8)[:, None]
    cal = fit_calibration(["M"], logits, target)["M"]
    assert cal.threshold == DEFAULT_THRESHOLD == 0.5
    assert cal.rule.startswith("calibrated 0.5") and "100 positive / 400 negative" in cal.rule
    # positives below the threshold stay few: calibration put the gap around 0.5, not below
    probs = cal.apply(logits[:, 0])
    assert float(probs[:100].min()) > 0.3 and float(probs[100:].max()) < 0.3
    # one class only: nothing to calibrate on, and the rule says so
    alone = fit_calibration(["M"], logits[100:], target[100:])["M"]
    assert (alone.temperature, alone.shift) == (1.0, 0.0) and alone.rule.startswith("uncalibrated")


def test_separable_validation_keeps_a_finite_temperature() -> None:
    logits = torch.cat([torch.linspace(2, 8, 100), torch.linspace(-8, -1, 400)])
    target = torch.cat([torch.ones(100), torch.zeros(400)]).to(torch.int8)
    t, shift = fit_scaling(logits, target)
    assert 0.1 < t < 1.0 and abs(shift) < 5  # sharper, but held by the priors


def test_exported_graph_applies_the_calibration(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("tiny", 2).eval()
    meta = {"markers": ["CD133", "CD44"], "tile_px": 32, "mpp": 2.0, "backbone": "tiny",
            "mean": [0.5] * 3, "std": [0.25] * 3,
            "calibration": {"CD133": {"temperature": 2.5, "shift": 1.0},
                            "CD44": {"temperature": 0.5, "shift": -0.5}}}
    tiles = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    export_onnx(model, meta, tmp_path / "m.onnx", check_tiles=tiles)
    got = ort.InferenceSession(str(tmp_path / "m.onnx"),
                               providers=["CPUExecutionProvider"]).run(None, {"tiles": tiles})[0]
    x = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        z = model(x)
    want = torch.sigmoid((z - torch.tensor([1.0, -0.5])) / torch.tensor([2.5, 0.5])).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    recorded = read_metadata(tmp_path / "m.onnx")["calibration"]
    assert recorded["applied_in"] == "graph" and recorded["CD133"]["temperature"] == 2.5
