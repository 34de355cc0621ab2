"""House rules: packaged configs are the built-in defaults, one optical-density formula, one CPU
count, and "not found" errors that are also the builtin FileNotFoundError."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from histocsc.config import load_config, packaged_config
from histocsc.errors import HistocscError

REPO = Path(__file__).resolve().parents[1]


def _configs():
    from histocsc.ihc.labels import LabelConfig
    from histocsc.ihc.registration import RegistrationConfig
    from histocsc.learn.train import TrainConfig
    from histocsc.wsi.grid import TilesConfig

    return {"tiles.yaml": TilesConfig, "register.yaml": RegistrationConfig,
            "label.yaml": LabelConfig, "train.yaml": TrainConfig}


@pytest.mark.parametrize("name", ["tiles.yaml", "register.yaml", "label.yaml", "train.yaml"])
def test_packaged_configs_spell_out_the_builtin_defaults(name):
    cls = _configs()[name]
    path = packaged_config(name)
    assert path.read_bytes() == (REPO / "configs" / name).read_bytes()  # one copy, shipped
    assert load_config(cls, path) == cls()


def test_demo_preset_ships_with_the_package():
    from histocsc.learn.train import load_train_config

    cfg = load_train_config(packaged_config("train-ci.yaml"))
    assert cfg.model.backbone == "tiny" and cfg.trainer.accelerator == "cpu"


def test_not_found_errors_are_file_not_found_errors(tmp_path):
    from histocsc.cohort import read_cohort
    from histocsc.ihc.transform import Transform
    from histocsc.learn.model import load_trained
    from histocsc.predict.engine import Engine

    missing = tmp_path / "absent"
    calls = [lambda: load_config(dict, missing), lambda: read_cohort(missing),
             lambda: Transform.load(missing), lambda: load_trained(missing),
             lambda: Engine(missing)]
    for call in calls:
        with pytest.raises(FileNotFoundError) as info:
            call()
        assert isinstance(info.value, HistocscError) and str(missing) in str(info.value)


def test_one_optical_density_formula():
    from histocsc.ihc import deconvolution
    from histocsc.learn.augment import HEDJitter
    from histocsc.wsi.optical_density import optical_density
    from histocsc.wsi.tissue import stain_channel

    rgb = np.array([[[255, 128, 0], [1, 254, 64]]], np.uint8)
    od = optical_density(rgb)
    assert od[0, 0].tolist() == pytest.approx([0.0, -math.log10(128 / 255), math.log10(255)])
    assert np.array_equal(od, optical_density(rgb.astype(np.float32)))
    assert deconvolution.optical_density is optical_density
    assert np.allclose(stain_channel(rgb, "optical_density"), od.mean(axis=2))
    grey = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    natural = optical_density(grey)[0, :, 0] * math.log(10)  # the jitter works in ln units
    assert np.allclose(HEDJitter._OD_LUT, natural, rtol=1e-6)


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="Linux only")
def test_cpu_count_respects_the_affinity_mask():
    code = ("import os; from histocsc.cpu import cpu_count; "
            "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); print(cpu_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_metrics_rows_of_an_earlier_run_survive_a_resume(tmp_path):
    """Lightning starts metrics.csv afresh; the earlier rows are set aside and put back first,
    under both runs' columns (also when a run died between the two steps)."""
    import csv

    from histocsc.learn import metrics_csv

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "metrics.csv").write_text("epoch,train/loss\n0,0.9\n")
    metrics_csv.set_aside(logs)
    assert not (logs / "metrics.csv").exists()
    (logs / "metrics.csv").write_text("epoch,val/auroc_mean\n1,0.7\n")  # a run that then died
    metrics_csv.set_aside(logs)
    (logs / "metrics.csv").write_text("epoch,train/loss\n2,0.5\n")
    metrics_csv.put_back(logs)
    with (logs / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert rows[1] == {"epoch": "1", "train/loss": "", "val/auroc_mean": "0.7"}
    assert sorted(p.name for p in logs.iterdir()) == ["metrics.csv"]
