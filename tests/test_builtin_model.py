"""The built-in model: the shipped file matches its card, and an installed wheel finds it."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from histocsc.io import file_checksum
from histocsc.learn.metadata import read_metadata
from histocsc.models import BUILTIN_CARD, BUILTIN_ONNX, builtin_card, builtin_model_path

ROOT = Path(__file__).resolve().parents[1]
CARD_MD = ROOT / "models" / "MODEL_CARD.md"


def test_shipped_model_matches_its_card() -> None:
    path = builtin_model_path()
    card = builtin_card()
    assert path.is_file() and path.name == BUILTIN_ONNX
    assert 100_000 < path.stat().st_size < 5_000_000  # small: a few hundred KB to a few MB
    assert file_checksum(path) == card["checksum"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == card["sha256"]
    assert path.stat().st_size == card["size_bytes"]
    meta = read_metadata(path)
    assert meta["markers"] == card["markers"] == ["CD133", "CD44"]
    assert meta["tile_px"] == card["tile_px"]
    assert meta["mpp"] == pytest.approx(card["mpp"])
    for m in card["markers"]:
        assert meta["thresholds"][m] == pytest.approx(card["thresholds"][m], abs=1e-4)
        for key in ("auroc", "ap", "sensitivity", "specificity"):
            row = card["heldout"]["markers"][m][key]
            assert row["min"] <= row["mean"] <= row["max"]
            assert len(row["per_seed"]) == len(card["heldout"]["seeds"]) >= 3


def test_model_card_states_the_shipped_facts() -> None:
    card = builtin_card()
    text = CARD_MD.read_text(encoding="utf-8")
    for phrase in ("research use only", "trained on synthetic phantom slides",
                   "not a diagnostic device", "never seen real CD133 / CD44 IHC"):
        assert phrase in text, phrase
    assert f"`{card['sha256']}`" in text
    assert f"`{card['checksum']}`" in text
    assert re.search(rf"\| tile size \| {card['tile_px']} px \|", text)
    assert re.search(rf"\| mpp \| {card['mpp']:g} µm/px", text)
    assert re.search(r"\| markers \| CD133, CD44 \|", text)
    for m in card["markers"]:  # the held-out table carries the card's figures
        h = card["heldout"]["markers"][m]
        assert re.search(rf"\| {m} \| {card['thresholds'][m]:.3f} \| "
                         rf"{card['test_split'][m]['auroc']:.3f} \| {h['auroc']['mean']:.3f} ",
                         text), m


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None,
                    reason="setuptools is needed to build the wheel (pip install setuptools)")
def test_installed_wheel_finds_the_model_and_templates(tmp_path: Path) -> None:
    src = tmp_path / "src"  # build from a copy: an in-tree build would leave build/ behind
    shutil.copytree(ROOT / "histocsc", src / "histocsc",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("histocsc-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    assert f"histocsc/models/{BUILTIN_ONNX}" in names
    assert f"histocsc/models/{BUILTIN_CARD}" in names
    assert "histocsc/predict/templates/report.html" in names
    probe = ("import histocsc, histocsc.models as m, histocsc.predict.report as r;"
             "p = m.builtin_model_path(); assert p.is_file(), p;"
             "assert m.is_builtin(m.builtin_card()['checksum']);"
             "assert '$css' in r.template('report.html');"
             "print(histocsc.__file__); print(p)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    package_file, model_file = out.stdout.split()
    assert Path(package_file).is_relative_to(site)  # the wheel's copy, not the source tree
    assert Path(model_file).is_relative_to(site)
