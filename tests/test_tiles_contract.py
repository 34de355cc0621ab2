"""`tiles` refuses hopeless requests, warns about wasteful ones, cleans up after Ctrl-C and
failures, and names the real source of a bad value."""

from __future__ import annotations

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

REPO = Path(__file__).resolve().parents[1]


def tiles(*args: object):
    return CliRunner().invoke(app, ["tiles", *map(str, args)])


@pytest.fixture(scope="module")
def svs(real_data: Path) -> Path:
    return real_data / "svs" / "cmu-1-small-region.svs"


def test_tile_larger_than_the_slide_is_an_error(svs: Path, tmp_path: Path) -> None:
    res = tiles(svs, "--out", tmp_path, "--tile-px", 100000)
    assert res.exit_code == 1 and "larger than the slide" in res.output, res.output
    assert not (tmp_path / svs.stem).exists()


def test_upsampling_warns_and_a_store_too_big_for_the_disk_is_refused(
        svs: Path, tmp_path: Path) -> None:
    """0.0005 µm/px tiles of 16384 px on a 0.499 µm/px slide: ~1000x upsampled, petabytes.
    (Larger than any file ext4 allows, so a regression fails at once instead of filling the
    disk: the old code wrote 47 GB of a 1.8 TB store before it was stopped.)"""
    res = tiles(svs, "--out", tmp_path, "--tile-px", 16384, "--mpp", 0.0005, "--save-images")
    assert res.exit_code == 1
    assert "998.0x finer than the slide's own pixels" in res.output
    assert "GB free" in res.output and "without --save-images" in res.output
    assert not list(tmp_path.rglob("*.npy"))


def test_failed_slide_leaves_no_empty_folder(tmp_path: Path) -> None:
    bad = tmp_path / "in" / "broken.svs"
    bad.parent.mkdir()
    bad.write_bytes(b"II*\0" + bytes(5000))
    res = tiles(bad, "--out", tmp_path / "out")
    assert res.exit_code == 1 and not (tmp_path / "out" / "broken").exists()


def test_override_warns_and_recursive_finds_sub_folders(svs: Path, tmp_path: Path) -> None:
    deep = tmp_path / "in" / "a" / "b"
    deep.mkdir(parents=True)
    shutil.copy(svs, deep / svs.name)
    res = tiles(tmp_path / "in", "--out", tmp_path / "out", "--mpp", 8, "--tile-px", 32)
    assert res.exit_code == 1 and "--recursive" in res.output
    res = tiles(tmp_path / "in", "--out", tmp_path / "out", "--mpp", 8, "--tile-px", 32,
                "--recursive", "--override-slide-mpp", 0.25)
    assert res.exit_code == 0, res.output
    assert "--override-slide-mpp 0.25 µm/px replaces the pixel size the file records (0.499" \
        in res.output
    assert (tmp_path / "out" / svs.stem / "grid.json").is_file()


def test_bad_value_names_the_command_line_not_the_config_file(svs: Path, tmp_path: Path) -> None:
    res = tiles(svs, "--out", tmp_path, "--config", REPO / "configs" / "tiles.yaml",
                "--mpp", -1)
    assert res.exit_code == 1 and "the command line: key 'mpp'" in res.output
    assert "tiles.yaml" not in res.output


def test_ctrl_c_removes_the_temporary_tile_store(svs: Path, tmp_path: Path,
                                                 ctrl_c_able: dict) -> None:
    """A real SIGINT while the worker processes fill the tile store."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "histocsc", "tiles", str(svs), "--out", str(out), "--save-images",
         "--tile-px", "64", "--mpp", "0.25", "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **ctrl_c_able)
    deadline = time.monotonic() + 240
    while not list(out.glob("*/.tiles.*.tmp.npy")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no temporary tile store appeared"
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 130 and "interrupted" in output, output
    assert "Traceback" not in output
    assert not list(out.rglob("*.tmp*")) and not list(out.rglob("tiles.npy"))
