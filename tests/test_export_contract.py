"""Export and training never replace results silently; int8 / fp16 variants pass a gate measured
on tiles not used for calibration, or are not written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_export import META, TILE, real_tiles, tiny_model, write_checkpoint  # noqa: F401
from typer.testing import CliRunner

from histocsc.cli import app
from histocsc.errors import ModelError
from histocsc.learn.export import export_onnx
from histocsc.learn.guard import guard_run_dir
from histocsc.learn.variant_gate import GateLimits

REPO = Path(__file__).resolve().parents[1]


def test_export_refuses_to_replace_a_model_without_force(tmp_path: Path) -> None:
    run = write_checkpoint(tmp_path / "run", tiny_model(1))
    out = tmp_path / "model.onnx"
    runner = CliRunner()
    assert runner.invoke(app, ["export", str(run), "--out", str(out)]).exit_code == 0
    before = out.read_bytes()
    write_checkpoint(tmp_path / "run", tiny_model(2))  # a different (e.g. worse) model
    res = runner.invoke(app, ["export", str(run), "--out", str(out)])
    assert res.exit_code == 1 and "--force" in res.output and str(out) in res.output
    assert out.read_bytes() == before
    res = runner.invoke(app, ["export", str(run), "--out", str(out), "--force"])
    assert res.exit_code == 0 and out.read_bytes() != before


def test_train_refuses_an_existing_run_without_resume_or_force(tmp_path: Path) -> None:
    run = tmp_path / "run"
    best = run / "checkpoints" / "best.ckpt"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"a better model")
    (run / "run.json").write_text("{}")
    res = CliRunner().invoke(app, ["train", "--config", str(REPO / "configs" / "train-ci.yaml"),
                                   "--data", str(tmp_path / "prepared"), "--out", str(run)])
    assert res.exit_code == 1 and "already holds a training run" in res.output
    assert "--resume" in res.output and best.read_bytes() == b"a better model"
    guard_run_dir(run, None, force=True)  # what --force does before training
    assert not best.exists() and not (run / "run.json").exists()


def test_int8_failing_its_gate_is_not_written(tmp_path: Path, real_tiles: np.ndarray) -> None:  # noqa: F811
    """The gate says by how much; the held-back half of the calibration tiles is measured."""
    out = tmp_path / "m.onnx"
    with pytest.raises(ModelError, match=r"int8 variant refused.*over the limit 1e-09") as info:
        export_onnx(tiny_model(), META, out, int8=True, calibration=real_tiles,
                    limits=GateLimits(max_prob_diff=1e-9))
    assert f"{len(real_tiles) // 2} tiles not used for calibration" in str(info.value)
    assert out.is_file() and not out.with_name("m.int8.onnx").exists()
    result = export_onnx(tiny_model(), META, out, int8=True, calibration=real_tiles)
    assert result.int8 is not None and result.int8.is_file()
    assert "max probability difference" in result.gates[0]


def test_gate_uses_labelled_tiles_and_never_calibration_tiles(
        tmp_path: Path, real_tiles: np.ndarray) -> None:  # noqa: F811
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (len(real_tiles), 2)).astype(np.int8)
    labels[:4] = [[0, 1], [1, 0], [0, 1], [1, 0]]
    out = tmp_path / "m.onnx"
    with pytest.raises(ModelError, match=r"AUROC change \(CD1?\d+\)"):
        export_onnx(tiny_model(), META, out, fp16=True, labelled=(real_tiles, labels),
                    limits=GateLimits(max_auroc_change=-1.0))
    assert not out.with_name("m.fp16.onnx").exists()
    ok = export_onnx(tiny_model(), META, out, fp16=True, labelled=(real_tiles, labels))
    assert f"on {len(real_tiles)} labelled tiles not used for calibration" in ok.gates[0]
    # labelled tiles that were also calibration tiles are left out of the int8 gate
    calib = real_tiles[:8]
    res = export_onnx(tiny_model(), META, out, int8=True, calibration=calib,
                      check_tiles=real_tiles, labelled=(real_tiles, labels),
                      limits=GateLimits(max_auroc_change=1.0))
    assert f"on {len(real_tiles) - 8} labelled tiles" in res.gates[0]
    assert json.loads(json.dumps(res.gates))  # plain text lines for the CLI
