"""Probabilities that mean what they say: per-marker calibration fitted on the validation split,
the decision threshold rule, and expected calibration error (ECE).

Calibrated probability of marker j: ``sigmoid((logit_j - shift_j) / T_j)``: Platt scaling
written as a temperature and a shift, both fitted on the labelled validation tiles by minimising
the negative log-likelihood with torch's LBFGS, with weak priors (log T ~ N(0, 1), shift ~ N(0,
5^2) logits) so that perfectly separated or tiny validation sets give finite values (MAP fit).
A temperature alone is not enough: the class-weighted loss and a short training leave the logits
of held-out cases shifted (on phantom seed 4 the Platt fit moved the logits up by 2.5 / 3.5; undoing
the loss weighting by log(pos_weight) instead moved them the wrong way and made the test ECE
worse). T = 1 and shift = 0 (the raw model) when validation lacks positives or negatives.
Neither changes the ranking (AUROC, AP).

The exported ONNX graph applies both (histocsc.learn.export.TileModel) and records them in its
metadata (``calibration``), so every client of the graph gets calibrated probabilities.

Threshold rule: the calibrated 0.5 for every marker: a tile (or heatmap cell) is called
positive when the calibrated model finds it more likely positive than not. An F1-best cut on the
validation tiles was tried first and dropped: on the near-separable validation sets of a trained
model it falls anywhere in the gap between the classes (at the 0.2 clamp for 4 of 8 marker-seeds
on four unseen phantom seeds), and it over-covered the heatmap (cell Dice 0.76 / 0.76 against
0.85 / 0.87 at 0.5 on a development seed). When validation lacks positives or negatives the model
stays uncalibrated and 0.5 is the raw model's (the rule text says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torchmetrics.functional.classification import binary_calibration_error

DEFAULT_THRESHOLD = 0.5
ECE_BINS = 15
T_RANGE = (0.05, 20.0)
SHIFT_PRIOR_SD = 5.0


@dataclass
class MarkerCalibration:
    """One marker's calibration and decision threshold, and how they were chosen."""

    temperature: float
    shift: float
    threshold: float
    rule: str

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((logits - self.shift) / self.temperature)


def collect_logits(module: Any, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets (N, markers) of a LightningModule over a DataLoader, in eval mode."""
    module.eval()
    logits, targets = [], []
    with torch.no_grad():
        for tiles, target in loader:
            x, y = module.on_after_batch_transfer((tiles.to(module.device), target), 0)
            logits.append(module(x).float().cpu())
            targets.append(y.cpu())
    if not logits:
        width = len(module.hparams.markers)
        return torch.zeros(0, width), torch.zeros(0, width, dtype=torch.int8)
    return torch.cat(logits), torch.cat(targets)


def fit_scaling(logits: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(T, shift) minimising the BCE of sigmoid((logits - shift) / T) plus the priors of this
    module's docstring (LBFGS over log T and shift); (1.0, 0.0) without both classes."""
    target = target.float()
    if logits.numel() == 0 or target.min() == target.max():
        return 1.0, 0.0
    log_t = torch.zeros(1, requires_grad=True)
    shift = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t, shift], lr=0.5, max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        nll = torch.nn.functional.binary_cross_entropy_with_logits(
            (logits - shift) / log_t.exp(), target, reduction="sum")
        prior = 0.5 * log_t.square().sum() + 0.5 * (shift / SHIFT_PRIOR_SD).square().sum()
        loss = (nll + prior) / len(target)
        loss.backward()
        return loss

    opt.step(closure)
    t, b = float(log_t.detach().exp()), float(shift.detach())
    if not (math.isfinite(t) and math.isfinite(b)):
        return 1.0, 0.0
    return min(max(t, T_RANGE[0]), T_RANGE[1]), b


def ece(probs: torch.Tensor, target: torch.Tensor) -> float:
    """Expected calibration error (L1, 15 equal-width bins; torchmetrics); NaN without tiles."""
    if probs.numel() == 0:
        return math.nan
    return float(binary_calibration_error(probs.float(), target.long(), n_bins=ECE_BINS,
                                          norm="l1"))


def fit_calibration(
    markers: list[str], logits: torch.Tensor, target: torch.Tensor,
) -> dict[str, MarkerCalibration]:
    """Per marker: temperature and shift from the labelled validation tiles (target -1 ignored),
    and the threshold rule of this module's docstring."""
    out = {}
    for j, marker in enumerate(markers):
        keep = target[:, j] >= 0
        z, t = logits[keep, j], target[keep, j]
        temperature, shift = fit_scaling(z, t)
        pos, neg = int((t == 1).sum()), int((t == 0).sum())
        fitted = pos > 0 and neg > 0
        rule = (f"calibrated {DEFAULT_THRESHOLD} (fitted on {pos} positive / {neg} negative "
                "validation tiles)" if fitted else
                f"uncalibrated {DEFAULT_THRESHOLD} (validation has {pos} positive / {neg} "
                "negative tiles: nothing to calibrate on)")
        out[marker] = MarkerCalibration(temperature=temperature, shift=shift,
                                        threshold=DEFAULT_THRESHOLD, rule=rule)
    return out


def calibration_report(
    calibration: dict[str, MarkerCalibration], logits: torch.Tensor, target: torch.Tensor,
) -> dict[str, dict[str, Any]]:
    """Per marker on a labelled split: ECE of the raw and of the calibrated probabilities."""
    out: dict[str, dict[str, Any]] = {}
    for j, (marker, cal) in enumerate(calibration.items()):
        keep = target[:, j] >= 0 if len(target) else torch.zeros(0, dtype=torch.bool)
        z, t = logits[keep, j], target[keep, j]
        out[marker] = {
            "ece_uncalibrated": ece(torch.sigmoid(z), t),
            "ece": ece(cal.apply(z), t),
            "temperature": cal.temperature,
            "shift": cal.shift,
            "threshold_used": cal.threshold,
            "threshold_rule": cal.rule,
        }
    return out


def to_meta(calibration: dict[str, MarkerCalibration]) -> dict[str, Any]:
    """What the checkpoint and the ONNX metadata record."""
    return {m: {"temperature": c.temperature, "shift": c.shift, "rule": c.rule}
            for m, c in calibration.items()}


def calibrate_run(module: Any, data: Any, best: Any) -> tuple[dict[str, MarkerCalibration],
                                                               dict[str, dict[str, Any]]]:
    """Load the best checkpoint into `module`, fit calibration and thresholds on the validation
    split of `data` (a TileDataModule) and measure ECE before/after on its test split."""
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    logits, target = collect_logits(module, data.val_dataloader())
    calibration = fit_calibration(list(data.markers), logits, target)
    report: dict[str, dict[str, Any]] = {}
    if data.cases["test"]:
        logits, target = collect_logits(module, data.test_dataloader())
        report = calibration_report(calibration, logits, target)
    return calibration, report
