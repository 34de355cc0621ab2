"""The built-in model: a small phantom-trained ONNX model shipped inside the package.

`histocsc infer` uses it when no `--model` is given. The ONNX file and its card facts (a JSON
written by `scripts/build_demo_model.py`, rendered for people as `models/MODEL_CARD.md`) are
package data, found through importlib.resources so that a wheel, an editable install and a
source checkout all see the same file.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

BUILTIN_ONNX = "histocsc-phantom-tiny.onnx"
BUILTIN_CARD = "histocsc-phantom-tiny.card.json"
CARD_URL = "models/MODEL_CARD.md"  # in the source tree; the same facts as BUILTIN_CARD
NOTICE = ("research use only; trained on synthetic phantom slides; not a diagnostic device; "
          "it has never seen real CD133 / CD44 IHC")


def builtin_model_path() -> Path:
    """Path of the shipped ONNX file (a real file: the package is never imported zipped)."""
    return Path(str(resources.files(__name__).joinpath(BUILTIN_ONNX)))


@cache
def builtin_card() -> dict[str, Any]:
    """The card facts of the shipped model (intended use, data, metrics, checksums)."""
    text = resources.files(__name__).joinpath(BUILTIN_CARD).read_text(encoding="utf-8")
    return dict(json.loads(text))


def is_builtin(checksum: str) -> bool:
    """True when a model with this histocsc checksum is the shipped one."""
    try:
        return checksum == builtin_card()["checksum"]
    except (OSError, KeyError, ValueError):
        return False


def builtin_facts(checksum: str) -> dict[str, Any]:
    """What summary.json says about a model being the built-in one."""
    if not is_builtin(checksum):
        return {"builtin": False}
    card = builtin_card()
    return {"builtin": True, "name": card["name"], "intended_use": card["intended_use"],
            "card": CARD_URL}
