"""Reading YAML configuration: the one loader for recipe, params and study files, YAML-typed
``key=value`` values, and ``${VAR:-default}`` environment expansion; every problem is a one-line
:class:`~vpr_ros.core.errors.ConfigError` naming the file.

Use::

    data = load_yaml(path, what="training recipe")   # -> dict (an empty file gives {})
    value = parse_value("1e-4", where="--set optim.lr")  # -> 0.0001
    root = expand_env("${VPR_ROS_SHARED:-../shared}/data", where="data.root")
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from vpr_ros.core.errors import ConfigError

__all__ = ["expand_env", "load_yaml", "parse_value"]


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """``line L, column C: problem`` (1-based) for a YAML syntax error; its text otherwise."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is None:
        return str(problem)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def load_yaml(path: str | os.PathLike, *, what: str) -> dict[str, Any]:
    """The top-level mapping of the YAML file ``path``; an empty file is ``{}``.

    ``what`` names the file's role in errors (``"params file"``, ``"training recipe"``). Raises
    :class:`ConfigError` with one line when the file is missing or unreadable, is not valid YAML (with
    line and column), or its top level is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        reason = "is a folder, not a file" if path.is_dir() else "not found"
        raise ConfigError(f"{what} {path}: {reason}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path}: cannot read it ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path}: not valid YAML at {_yaml_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: the top level must be a mapping of keys, "
                          f"not a {type(data).__name__}")
    return data


def parse_value(text: str, *, where: str) -> Any:
    """A command-line value read as a YAML scalar or flow list (``3`` -> 3, ``[1, 2]`` -> [1, 2],
    ``true`` -> True); an empty text is ``""``."""
    if not text.strip():
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: value {text!r} is not valid YAML ({_yaml_problem(exc)})") from None


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str, *, where: str = "value") -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}`` (the default also applies to a set but empty VAR);
    an unset variable without a default is a :class:`ConfigError` naming ``where``."""

    def sub(m: re.Match) -> str:
        value = os.environ.get(m.group(1))
        if value is None or value == "":
            if m.group(2) is None:
                raise ConfigError(f"{where}: environment variable {m.group(1)} is not set and has no default")
            return m.group(2)
        return value

    return _ENV.sub(sub, text)
