"""Typed configuration: pydantic models loaded from YAML, with command-line overrides.

The YAML files of `configs/` ship inside the package (`histocsc/configs`, package data), so an
installed wheel reads the same presets as a source checkout; `packaged_config` finds them, and
every `--config` option accepts a preset's name (`resolve_config`). Each of
tiles.yaml, register.yaml, label.yaml and train.yaml spells out the built-in defaults (a test
holds them equal); train-ci.yaml is the tiny preset of CI and the demo.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from histocsc.errors import ConfigError, ConfigNotFoundError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """A configuration section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def load_config(
    model_cls: type[M], path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> M:
    """Read YAML at `path` (optional), apply `overrides` (dotted keys allowed), validate.

    A bad value is reported with its real source: the file, the command line (`overrides`) or
    the built-in defaults."""
    data: dict[str, Any] = {}
    if path is not None:
        path = resolve_config(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        data = loaded or {}
    from_file = copy.deepcopy(data)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key, value in given.items():
        _set_dotted(data, key, value)
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, from_file, set(given))) from exc


def packaged_config(name: str) -> Path:
    """Path of a YAML file shipped in histocsc/configs (e.g. 'train-ci.yaml')."""
    path = Path(str(resources.files("histocsc").joinpath("configs", name)))
    if not path.is_file():
        raise ConfigNotFoundError(f"{path}: packaged configuration not found (broken install?)")
    return path


def presets() -> list[str]:
    """Names of the packaged configuration presets (train, train-ci, tiles, ...), sorted."""
    folder = resources.files("histocsc").joinpath("configs")
    return sorted(Path(str(p)).stem for p in folder.iterdir() if str(p).endswith(".yaml"))


def resolve_config(path: str | Path) -> Path:
    """A configuration file: `path` itself when it exists, else the packaged preset it names
    ('train-ci', 'train-ci.yaml', or 'configs/train-ci.yaml' from any folder)."""
    path = Path(path)
    if path.is_file():
        return path
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    by_name = path.parent in (Path("."), Path("configs")) and path.suffix in ("", ".yaml")
    if by_name and name in presets():
        return packaged_config(f"{name}.yaml")
    raise ConfigNotFoundError(
        f"{path}: configuration file not found (packaged presets, usable by name from any "
        f"folder: {', '.join(presets())}; `histocsc config show NAME` prints one)")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ['a.b=1', 'c=x'] into {'a.b': 1, 'c': 'x'}, values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw)
    return out


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def _in_file(data: Any, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _source(key: str, path: str | Path | None, from_file: dict[str, Any], given: set[str]) -> str:
    """Where the value of `key` came from: the command line, the file, or the defaults."""
    if any(key == g or key.startswith(g + ".") for g in given):
        return "the command line"
    if path is not None and _in_file(from_file, key):
        return str(path)
    if not key:  # a rule over several keys: name every source that contributed
        parts = [str(path)] * bool(path and from_file) + ["the command line"] * bool(given)
        return " + ".join([*parts, "the built-in defaults"])
    return "the built-in defaults"


def _describe(
    exc: ValidationError, path: str | Path | None, from_file: dict[str, Any], given: set[str]
) -> str:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        where = _source(key, path, from_file, given)
        if err["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown key {key!r}")
        else:
            problems.append(f"{where}: key {key or '(top level)'!r}: {err['msg']}")
    return "; ".join(problems)
