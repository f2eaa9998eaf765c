"""The training methods by name (:data:`METHODS`), how a recipe finds its method, and the entry points
that train a recipe and export a checkpoint whatever their method.

A recipe names its method with a top-level ``method:`` key (``loqi``, ``general``, ``scicevpr``,
``structvpr``); a recipe without one is read by the one method whose recipe has all its top-level
sections, and as a LoQI recipe when several or none do. Each method module holds only what is its own
(recipe sections, losses, data, stages) and registers a :class:`~vpr_ros.training.engine.Method`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from vpr_ros.core.errors import ConfigError
from vpr_ros.core.models import read_checkpoint
from vpr_ros.training.config import read_recipe
from vpr_ros.training.engine import Method, TrainResult
from vpr_ros.training.methods import general, loqi, scicevpr
from vpr_ros.training.methods.structvpr import pipeline as structvpr

METHODS: dict[str, Method] = {
    m.name: m for m in (loqi.METHOD, general.METHOD, scicevpr.METHOD, structvpr.METHOD)
}
DEFAULT = "loqi"


def method_named(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"method: {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]


def method_for(raw: dict[str, Any]) -> Method:
    """The method of a raw recipe mapping: its ``method:`` key, else by its sections (module docstring)."""
    if "method" in raw:
        return method_named(str(raw["method"]))
    keys = set(raw)
    fits = [m for m in METHODS.values() if keys <= {f.name for f in fields(m.recipe)}]
    return fits[0] if len(fits) == 1 else METHODS[DEFAULT]


def method_of(cfg: Any) -> Method:
    """The method whose recipe type ``cfg`` is."""
    for m in METHODS.values():
        if type(cfg) is m.recipe:
            return m
    raise ConfigError(f"{type(cfg).__name__} is not the recipe of a registered method ({', '.join(METHODS)})")


def recipe_from_dict(raw: dict[str, Any] | None, overrides: Sequence[str] = ()) -> tuple[Method, Any]:
    """(method, validated recipe) of a raw recipe mapping plus ``key=value`` overrides."""
    method = method_for(raw or {})
    return method, method.config(raw, overrides)


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> tuple[Method, Any]:
    """(method, validated recipe) of a recipe file plus ``key=value`` overrides."""
    raw = read_recipe(path)
    try:
        return recipe_from_dict(raw, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def train(cfg: Any, *, resume: bool = False) -> TrainResult:
    """Run (or, with ``resume``, continue) a recipe of any registered method to its final step."""
    return method_of(cfg).train(cfg, resume=resume)


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, *, sidecar: bool | None = None) -> Path:
    """The deployed student of a training checkpoint, written by the method that trained it (its
    ``meta["method"]``); ``sidecar`` (default: the method's) also writes ``OUT.json``."""
    name = read_checkpoint(checkpoint).get("meta", {}).get("method") or DEFAULT
    method = METHODS.get(name, METHODS[DEFAULT])
    return method.export(checkpoint, out, sidecar=method.sidecar if sidecar is None else sidecar)
