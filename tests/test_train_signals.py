"""`histocsc train` stopped from outside: SIGTERM keeps last.ckpt and exits 143 with one line,
the half-made run folder is named as incomplete on the next `train --out`, SIGUSR1 under SLURM
saves Lightning's hpc checkpoint and requeues; without a terminal it logs one line per epoch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from histocsc.cli import app

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_train import make_prepared_cohort  # noqa: E402


@pytest.mark.slow
def test_sigterm_and_slurm_sigusr1(tmp_path: Path, ctrl_c_able: dict) -> None:
    data = make_prepared_cohort(tmp_path / "prep", n_tiles=40)
    run = tmp_path / "run"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'requeue.txt'}\n")
    (fake / "scontrol").chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{fake}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "histocsc-test",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
           "SLURM_NODELIST": "localhost"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "histocsc", "train", "--config", "train-ci", "--data", str(data),
         "--out", str(run), "--set", "trainer.max_epochs=500", "--set", "trainer.patience=500",
         "--set", "data.num_workers=1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **ctrl_c_able)
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "last.ckpt").is_file() and proc.poll() is None:
        assert time.monotonic() < deadline, "no epoch finished"
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    while not (tmp_path / "requeue.txt").is_file() and proc.poll() is None:
        assert time.monotonic() < deadline, "no requeue"
        time.sleep(0.2)
    assert (tmp_path / "requeue.txt").read_text().split() == ["requeue", "4242"]
    assert list(run.glob("hpc_ckpt_*.ckpt"))
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output
    assert "stopped by SIGTERM" in output and "last.ckpt kept" in output
    assert "Traceback" not in output and "Tip" not in output
    assert "epoch 1/500: train loss" in output  # one line per epoch in a batch log
    assert not (run / "run.json").exists()
    res = CliRunner().invoke(app, ["train", "--config", "train-ci", "--data", str(data),
                                   "--out", str(run)])
    assert res.exit_code == 1 and "incomplete training run" in res.output
    assert "--resume" in res.output
