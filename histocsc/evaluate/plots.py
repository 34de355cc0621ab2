"""Pictures of `histocsc evaluate`: reliability diagram, and truth | heatmap | disagreement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from histocsc.io import atomic_path

DISAGREEMENT = {"agree, positive": (0.15, 0.65, 0.25), "false positive": (0.9, 0.2, 0.2),
                "false negative": (0.2, 0.4, 0.95), "agree, negative": (0.93, 0.93, 0.93),
                "unknown truth": (1.0, 1.0, 1.0)}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", dpi=110)
    _plt().close(fig)
    return path


def plot_reliability(path: Path, bins: list[dict[str, Any]], marker: str,
                     ece: float | None) -> Path:
    """Observed positive frequency against mean predicted probability per bin, with counts."""
    plt = _plt()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    used = [b for b in bins if b["count"]]
    top.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    top.plot([b["mean_predicted"] for b in used], [b["observed"] for b in used], "o-",
             color="tab:red", label="heatmap cells")
    top.set_ylabel("observed positive fraction")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    ece_text = "n/a" if ece is None else f"{ece:.3f}"
    top.set_title(f"{marker}: reliability (ECE {ece_text})", fontsize=10)
    top.legend(fontsize=8, loc="upper left")
    centres = [(b["low"] + b["high"]) / 2 for b in bins]
    bottom.bar(centres, [max(b["count"], 0.5) for b in bins], width=0.09, color="tab:grey")
    bottom.set_yscale("log")
    bottom.set_ylabel("cells")
    bottom.set_xlabel(f"predicted probability {marker}+")
    return _save(fig, path)


def plot_comparison(path: Path, arrays: dict[str, np.ndarray], marker: str,
                    figures: dict[str, Any]) -> Path:
    """Three panels on the truth raster: truth, heatmap, and where they disagree."""
    from matplotlib.patches import Patch

    plt = _plt()
    truth, heat = arrays["truth"], arrays["heat"]
    known, pred, pos = arrays["known"], arrays["pred"], arrays["truth_pos"]
    h, w = truth.shape
    scale = 4.0 / max(h, w)
    fig, axes = plt.subplots(1, 3, figsize=(3 * max(2.5, w * scale) + 1.5, max(2.5, h * scale) + 1))
    axes[0].imshow(np.ma.masked_invalid(truth), cmap="Reds", vmin=0, vmax=1,
                   interpolation="nearest")
    axes[0].set_title(f"truth {marker}+", fontsize=10)
    img = axes[1].imshow(np.ma.masked_invalid(heat), cmap="inferno", vmin=0, vmax=1,
                         interpolation="nearest")
    axes[1].set_title(f"heatmap (threshold {figures['threshold']:.2f})", fontsize=10)
    fig.colorbar(img, ax=axes[1], fraction=0.046, pad=0.02)
    code = np.zeros((h, w, 3), np.float32)
    masks = {"agree, positive": pred & pos, "false positive": pred & ~pos,
             "false negative": ~pred & pos, "agree, negative": ~pred & ~pos,
             "unknown truth": ~known}
    for name, sel in masks.items():
        code[sel] = DISAGREEMENT[name]
    axes[2].imshow(code, interpolation="nearest")
    px = figures["pixel"]
    axes[2].set_title(f"disagreement (pixel Dice {px['dice']:.2f}, IoU {px['iou']:.2f})",
                      fontsize=10)
    axes[2].legend(handles=[Patch(color=c, label=n) for n, c in DISAGREEMENT.items()],
                   fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2,
                   frameon=False)
    for ax in axes:
        ax.set_axis_off()
    return _save(fig, path)
