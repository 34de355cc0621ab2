"""Shared fixtures: the real data folder beside the repository, when present."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The shared real data folder; tests that need it skip when this clone has none."""
    if not (REAL_DATA / "SOURCES.md").is_file():
        pytest.skip(f"real data not found at {REAL_DATA} (only present beside the project's CI)")
    return REAL_DATA


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def ctrl_c_able() -> dict:
    """Popen keyword arguments for a child that SIGINT (Ctrl-C) can stop even when the tests run
    as a background job: a non-interactive shell starts those with SIGINT ignored, and the child
    would inherit that and run to the end."""
    return {"preexec_fn": _default_sigint}
