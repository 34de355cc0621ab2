"""The cohort table (Excel BOM, patient, pixel-size columns, undeclared columns) and `prepare`'s
options: --slide-mpp and per-slide pixel sizes, --shard, --force, and a prompt Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from histocsc.cli import app
from histocsc.cohort import read_cohort
from histocsc.errors import DataError
from histocsc.learn.data import DataConfig, assign_splits
from histocsc.synthetic.generate import make_cohort

REPO = Path(__file__).resolve().parents[1]
PAIR = ("Rat-Kidney_HE.jpg", "Rat-Kidney_PanCytokeratin.jpg")


def write(path: Path, text: str, bom: bool = False) -> Path:
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return path


def test_excel_csv_with_byte_order_mark(tmp_path: Path) -> None:
    table = write(tmp_path / "c.csv", "case,he,CD44,split\na,a.svs,b.svs,train\n", bom=True)
    cohort = read_cohort(table)
    assert cohort.markers == ["CD44"] and cohort.cases[0].case == "a"


def test_patient_and_pixel_size_columns_are_not_markers(tmp_path: Path) -> None:
    table = write(tmp_path / "c.csv", "case,he,CD44,split,patient,he_mpp,CD44_mpp,mpp\n"
                  "a,a.svs,b.svs,train,P1,0.25,,0.5\n")
    cohort = read_cohort(table)
    case = cohort.cases[0]
    assert cohort.markers == ["CD44"] and case.patient == "P1"
    assert case.slide_mpp("he") == 0.25 and case.slide_mpp("CD44") == 0.5


@pytest.mark.parametrize(("header", "row", "problem"), [
    ("case,he,CD44,age", "a,a.svs,b.svs,63", "column 'age' holds '63', not a slide file"),
    ("case,he,CD44,SOX2_mpp", "a,a.svs,b.svs,0.5", "'SOX2', which is not a column"),
    ("case,he,CD44,he_mpp", "a,a.svs,b.svs,fast", "he_mpp 'fast' is not a pixel size"),
])
def test_undeclared_or_bad_columns_are_errors(tmp_path: Path, header: str, row: str,
                                              problem: str) -> None:
    table = write(tmp_path / "c.csv", f"{header}\n{row}\n")
    with pytest.raises(DataError, match=problem) as info:
        read_cohort(table)
    assert str(table) in str(info.value)


def test_cases_of_one_patient_share_a_split() -> None:
    cases = [f"c{i}" for i in range(10)]
    patients = {c: f"P{i // 2}" for i, c in enumerate(cases)}  # five patients, two cases each
    rate = {c: i / 10 for i, c in enumerate(cases)}
    cfg = DataConfig(val_fraction=0.2, test_fraction=0.2)
    for seed in range(8):
        split = assign_splits(cases, {}, rate, cfg, seed, patients)
        for i in range(0, 10, 2):
            assert split[cases[i]] == split[cases[i + 1]], (seed, split)
        assert {"train", "val", "test"} <= set(split.values())
    with pytest.raises(DataError, match="patient P0.*different splits"):
        assign_splits(cases, {"c0": "train", "c1": "test"}, rate, cfg, 0, patients)
    assert assign_splits(cases, {"c0": "test"}, rate, cfg, 0, patients)["c1"] == "test"


def prepare(*args: object):
    return CliRunner().invoke(app, ["prepare", *map(str, args)])


TILES_YAML = "tile_px: 64\nmpp: 20.0\nmin_tissue_fraction: 0.3\n"


@pytest.fixture()
def jpeg_cohort(real_data: Path, tmp_path: Path) -> Path:
    """Real JPEG sections (no pixel size in the files): one case sized by the cohort's columns,
    one left to --slide-mpp."""
    folder = real_data / "registration"
    for name in PAIR:
        shutil.copy(folder / name, tmp_path / name)
    (tmp_path / "tiles.yaml").write_text(TILES_YAML)
    return write(tmp_path / "cohort.csv", "case,he,CK,split,he_mpp,CK_mpp\n"
                 f"col,{PAIR[0]},{PAIR[1]},train,10,10\ncli,{PAIR[0]},{PAIR[1]},test,,\n")


def test_slides_without_pixel_size_take_it_from_cohort_or_option(jpeg_cohort: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "out"
    common = ["--cohort", jpeg_cohort, "--out", out, "--workers", 1,
              "--tiles-config", tmp_path / "tiles.yaml"]
    res = prepare(*common)
    assert res.exit_code == 1 and "--slide-mpp" in res.output
    summary = {c["case"]: c for c in json.loads((out / "summary.json").read_text())["cases"]}
    assert summary["col"]["status"] != "failed", summary["col"]
    assert summary["cli"]["status"] == "failed" and "--slide-mpp" in summary["cli"]["error"]
    assert json.loads((out / "col" / "grid.json").read_text())["slide_mpp"] == 10
    res = prepare(*common, "--slide-mpp", 10)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "cli" / "grid.json").read_text())["slide_mpp"] == 10
    copy = read_cohort(out / "cohort.csv")  # the copy training reads keeps the columns
    assert copy.cases[0].mpp == {"he": 10.0, "CK": 10.0} and copy.markers == ["CK"]
    reused = prepare(*common, "--slide-mpp", 10)
    assert reused.exit_code == 0 and "(reused)" in reused.output
    forced = prepare(*common, "--slide-mpp", 10, "--force")
    assert forced.exit_code == 0 and "(reused)" not in forced.output


def test_shard_prepares_every_nth_case(tmp_path: Path) -> None:
    table = write(tmp_path / "c.csv", "case,he,CD44,split\n" + "".join(
        f"{n},{n}.svs,{n}_ihc.svs,\n" for n in ("a", "b", "c", "d")))
    res = prepare("--cohort", table, "--out", tmp_path / "o", "--shard", "1/2")
    assert res.exit_code == 1
    summary = json.loads((tmp_path / "o" / "summary-1-of-2.json").read_text())
    assert [c["case"] for c in summary["cases"]] == ["b", "d"]
    assert "0 <= I < N" in prepare("--cohort", table, "--out", tmp_path / "o",
                                   "--shard", "2/2").output


def test_ctrl_c_stops_prepare_promptly(tmp_path: Path, ctrl_c_able: dict) -> None:
    """A real SIGINT once the first cases run: no new case starts after it."""
    make_cohort(tmp_path / "ph", 1, size_px=2048, mpp=1.0, seed=3)
    he, ihc = tmp_path / "ph" / "case000" / "case000_HE.tiff", tmp_path / "ph" / "case000"
    rows = "".join(f"case{i},{he},{ihc / 'case000_CD44.tiff'},\n" for i in range(8))
    table = write(tmp_path / "c.csv", "case,he,CD44,split\n" + rows)
    (tmp_path / "tiles.yaml").write_text("tile_px: 64\nmpp: 4.0\n")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "histocsc", "prepare", "--cohort", str(table), "--out", str(out),
         "--workers", "2", "--tiles-config", str(tmp_path / "tiles.yaml")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **ctrl_c_able)
    deadline = time.monotonic() + 300
    while not list(out.glob("case*/")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no case started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "interrupted" in output, output
    started = [p for p in out.glob("case*") if p.is_dir()]
    assert 1 <= len(started) <= 4, sorted(p.name for p in started)
    assert not list(out.rglob(".tiles.*.tmp.npy"))
