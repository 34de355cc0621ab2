"""Configuration: YAML into validated models; unknown keys and bad values name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from histocsc.config import StrictModel, load_config, parse_overrides
from histocsc.errors import ConfigError


class Inner(StrictModel):
    size: int = 4


class Example(StrictModel):
    name: str = "x"
    rate: float = 0.5
    inner: Inner = Inner()


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: abc\ninner:\n  size: 8\n")
    cfg = load_config(Example, path, parse_overrides(["rate=0.25", "inner.size=16"]))
    assert (cfg.name, cfg.rate, cfg.inner.size) == ("abc", 0.25, 16)


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  sise: 8\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*unknown key 'inner.sise'"):
        load_config(Example, path)


def test_bad_value_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'rate'"):
        load_config(Example, None, {"rate": "fast"})


def test_missing_file_and_bad_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(Example, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["rate"])


def test_packaged_presets_by_name_from_any_folder(tmp_path: Path, monkeypatch) -> None:
    """`--config train-ci` (or the documented configs/train-ci.yaml) works outside the checkout;
    `train --help` lists the presets and `config show` writes one out."""
    from typer.testing import CliRunner

    from histocsc.cli import app
    from histocsc.config import packaged_config, resolve_config
    from histocsc.learn.train import load_train_config

    monkeypatch.chdir(tmp_path)
    for name in ("train-ci", "train-ci.yaml", "configs/train-ci.yaml"):
        assert resolve_config(name) == packaged_config("train-ci.yaml")
        assert load_train_config(name).model.backbone == "tiny"
    with pytest.raises(ConfigError, match="presets.*train-ci"):
        resolve_config("trian-ci")
    runner = CliRunner()
    assert "train-ci" in runner.invoke(app, ["train", "--help"]).output
    shown = runner.invoke(app, ["config", "show", "train-ci"])
    assert shown.exit_code == 0 and shown.output == packaged_config("train-ci.yaml").read_text()
    assert "train-ci" in runner.invoke(app, ["config", "list"]).output
