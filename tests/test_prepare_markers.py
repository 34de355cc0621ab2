"""A real two-case cohort with one marker each (empty cells), prepared whole and marker by
marker into one folder; the upsampling warning and the summary table of `prepare`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from histocsc.cli import app
from histocsc.cohort import read_cohort

RAT = ("Rat-Kidney_HE.jpg", "Rat-Kidney_PanCytokeratin.jpg")
LUNG = ("Izd2-29-041-w35_HE.jpg", "Izd2-29-041-w35_proSPC.jpg")


@pytest.fixture()
def real_cohort(real_data: Path, tmp_path: Path) -> Path:
    """rat: PanCK only; lung: proSPC only (5 µm/px sections, no pixel size in the files)."""
    r = real_data / "registration"
    table = tmp_path / "cohort.csv"
    table.write_text("case,he,PanCK,proSPC,mpp,split\n"
                     f"rat,{r / RAT[0]},{r / RAT[1]},,5,train\n"
                     f"lung,{r / LUNG[0]},,{r / LUNG[1]},5,val\n")
    return table


def prepare(table: Path, out: Path, *args: object):
    return CliRunner().invoke(app, ["prepare", "--cohort", str(table), "--out", str(out),
                                    "--workers", "1", "--mpp", "5", "--tile-px", "32",
                                    *map(str, args)])


def labels(case_dir: Path) -> dict[str, list[str]]:
    with (case_dir / "labels.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {c: [r[c] for r in rows] for c in rows[0]}


def test_empty_marker_cell_is_no_ihc_not_a_failure(tmp_path: Path) -> None:
    table = tmp_path / "c.csv"
    (tmp_path / "he.svs").write_bytes(b"")
    table.write_text("case,he,CD133,CD44,split\na,he.svs,,missing.svs,train\n")
    case = read_cohort(table).cases[0]
    assert case.ihc["CD133"] is None
    assert case.problems(["CD133", "CD44"]) == [
        f"case a: CD44 IHC slide not found: {tmp_path / 'missing.svs'}"]


@pytest.mark.slow
def test_one_marker_each_and_marker_by_marker(real_cohort: Path, tmp_path: Path) -> None:
    whole = prepare(real_cohort, tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    for case, has, lacks in (("rat", "PanCK", "proSPC"), ("lung", "proSPC", "PanCK")):
        qc = json.loads((tmp_path / "whole" / case / "qc.json").read_text())
        assert qc["status"] == "ok" and qc["markers"][lacks]["no_ihc"], qc
        assert qc["markers"][has]["registration_ok"] and qc["markers"][has]["positive"] > 0
        cols = labels(tmp_path / "whole" / case)
        assert set(cols[f"{lacks}_label"]) == {"-1"}  # ignored, not negative
        assert {"0", "1"} <= set(cols[f"{has}_label"])
    assert "no IHC" in whole.output

    # one marker at a time into one folder: the second run keeps the first one's results
    out = tmp_path / "split"
    assert prepare(real_cohort, out, "--markers", "PanCK").exit_code == 0
    first = json.loads((out / "rat" / "qc.json").read_text())["markers"]["PanCK"]
    second = prepare(real_cohort, out, "--markers", "proSPC")
    assert second.exit_code == 0, second.output
    rat = json.loads((out / "rat" / "qc.json").read_text())
    assert rat["markers"]["PanCK"] == first and rat["status"] == "ok"
    assert labels(out / "rat")["PanCK_label"] == labels(tmp_path / "whole" / "rat")["PanCK_label"]
    assert (out / "rat" / "label_map_PanCK.png").is_file()
    again = prepare(real_cohort, out)  # both markers are now done: nothing is redone
    reused = [line for line in again.output.splitlines() if line.startswith("│")
              and "reused" in line]
    assert again.exit_code == 0 and len(reused) == 2, again.output


def test_prepare_warns_on_upsampling_in_qc_and_table(real_cohort: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["prepare", "--cohort", str(real_cohort), "--out",
                                   str(tmp_path / "o"), "--workers", "1", "--mpp", "2.5",
                                   "--tile-px", "64", "--markers", "PanCK"])
    assert res.exit_code == 0, res.output
    qc = json.loads((tmp_path / "o" / "rat" / "qc.json").read_text())
    assert qc["upsampling"] == 2.0
    assert any("2.0x finer than the slide's own pixels" in w for w in qc["warnings"])
    lines = res.output.splitlines()
    rows = [line for line in lines if line.startswith("│ rat ")]
    assert len(rows) == 1 and "upsampled 2x" in rows[0], res.output  # one line, no wrap
    assert all(len(line) <= 80 for line in lines if line[:1] in "┏┃┡│└")
    assert "cases/s" not in res.output
    assert any(line.startswith("rat: warning:") and "finer" in line for line in lines)
