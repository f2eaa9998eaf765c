"""Text generated from the nodes' parameter specs and the graph: the parameter and launch-argument
tables of the docs, and the comments of config/localize.yaml.

``scripts/gen_param_docs.py`` rewrites them; ``--check`` (and test/test_param_specs.py) fails on drift.
"""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vpr_ros.core.errors import ConfigError
from vpr_ros.core.fileio import atomic_write_text
from vpr_ros.ros import graph
from vpr_ros.ros.node_kit import spec_table

__all__ = ["BLOCKS", "CONFIG", "Block", "config_text", "generated", "launch_table", "render_value", "write"]

#: The params file whose comments are generated (relative to the repository root).
CONFIG = "config/localize.yaml"
WIDTH = 100
NBSP = "\xa0"


@dataclass(frozen=True)
class Block:
    """A generated block of a markdown file, between ``<!-- marker -->`` and ``<!-- /marker -->``."""

    path: str
    marker: str
    node: str | None  # the node whose parameter table it is; None: the launch arguments

    def render(self) -> str:
        if self.node is None:
            return launch_table()
        return spec_table(graph.param_specs(self.node).values())


BLOCKS: tuple[Block, ...] = (
    Block("docs/ros.md", "launch-args", None),
    Block("docs/ros.md", "localizer-params", "localizer"),
    Block("docs/ros.md", "transmitter-params", "transmitter"),
    Block("docs/loop_closure.md", "loop-closure-params", "loop_closure"),
)


def _cell(text: str) -> str:
    return text.replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def launch_table() -> str:
    """A markdown table of the launch arguments (parameter arguments described by their specs)."""
    rows = ["| argument | default | sets | choices / range | description |", "|---|---|---|---|---|"]
    for a in graph.launch_arguments("<install>/share/vpr_ros/config/localize.yaml"):
        if a.target is None:
            limits = ", ".join(a.choices) if a.choices else ""
            rows.append(f"| `{a.name}` | `{a.default!r}` |  | {limits} | {_cell(a.description)} |")
            continue
        node, _, param = a.target.partition(".")
        spec = graph.param_specs(node)[param]
        models = "a registered model (`vpr-ros models`)" if a.target == "localizer.model" else ""
        limits = spec.limits or models
        rows.append(f"| `{a.name}` | (params file) | `{a.target}` | {limits} | {_cell(spec.description)} |")
    return "\n".join(rows)


def _replace_block(text: str, block: Block) -> str:
    marker = re.escape(block.marker)
    pattern = re.compile(rf"(<!-- {marker} -->\n).*?(<!-- /{marker} -->)", re.S)
    if not pattern.search(text):
        raise ConfigError(f"{block.path}: no <!-- {block.marker} --> ... <!-- /{block.marker} --> block")
    return pattern.sub(lambda m: f"{m.group(1)}{block.render()}\n{m.group(2)}", text, count=1)


# --------------------------------------------------------------------------- config/localize.yaml


def render_value(value: Any) -> str:
    """``value`` as a YAML scalar that reads back as the same value and type."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, str):
        plain = value and yaml.safe_load(value) == value and not re.search(r": |\s#|^\s|\s$", value)
        text = value if plain else json.dumps(value)
    else:
        raise ConfigError(f"{CONFIG}: cannot write {value!r} ({type(value).__name__}) as a parameter value")
    back = yaml.safe_load(text)
    if back != value or type(back) is not type(value):
        raise ConfigError(f"{CONFIG}: {value!r} would not read back as itself")
    return text


def _comment(text: str, indent: str) -> list[str]:
    lines = textwrap.wrap(text, WIDTH - len(indent) - 2, initial_indent=f"{indent}# ",
                          subsequent_indent=f"{indent}# ", break_on_hyphens=False)
    return [line.replace(NBSP, " ") for line in lines]


def _wire_text(w: graph.Wire) -> str:
    source = w.source if w.source is not None else render_value(w.value)
    if w.derive is not None:
        source = f"{w.derive.__name__}({source})"
    when = {"unset": "unless set here", "empty": "when empty here", "always": "always"}[w.rule]
    cond = f"with {w.when}, " if w.when else ""
    return f"{w.param} = {source} ({cond}{when})"


def config_text(text: str) -> str:
    """``text`` (a params file) with every comment after its header generated.

    The header (the lines before the first node section) and the values are kept; each section
    opens with the wiring its node gets from :data:`graph.WIRES`, and each parameter is preceded by
    its spec's description and allowed values. Unknown nodes or parameters, and invalid values,
    are a :class:`ConfigError`.
    """
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if re.match(r"[^\s#]", line)), len(lines))
    header = lines[:first]
    while header and not header[-1].strip():
        header.pop()
    data = yaml.safe_load(text) or {}
    out = [*header, ""] if header else []
    for section, body in data.items():
        name = str(section).strip("/")
        gn = graph.graph_node(name)
        params = (body or {}).get("ros__parameters") if isinstance(body, dict) else None
        if not isinstance(params, dict):
            raise ConfigError(f"{CONFIG}: {section!r} has no 'ros__parameters' mapping")
        specs = graph.param_specs(gn.name)
        out += [f"{section}:", "  ros__parameters:"]
        wires = [w for w in graph.WIRES if w.node == gn.name]
        if wires:
            out += _comment("Wired by the launch file and the runner (vpr_ros.ros.graph.WIRES):", "    ")
            out += [f"    #   {_wire_text(w)}" for w in wires]
        for key, value in params.items():
            spec = specs.get(key)
            if spec is None:
                raise ConfigError(f"{CONFIG}: {gn.name} declares no parameter {key!r}")
            reason = spec.check(spec.coerce(value))
            if reason is not None:
                raise ConfigError(f"{CONFIG}: {gn.name}: {reason}")
            # no-break spaces keep a range on one comment line
            limits = (f" (one of: {spec.limits})" if spec.choices
                      else f" (in{NBSP}{spec.limits.replace(' ', NBSP)})" if spec.limits else "")
            out += _comment(f"{spec.description}{limits}", "    ")
            out.append(f"    {key}: {render_value(value)}")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


# --------------------------------------------------------------------------- all files


def generated(root: Path) -> dict[Path, str]:
    """Every generated file's expected text (path under ``root`` -> text)."""
    texts: dict[Path, str] = {}
    for block in BLOCKS:
        path = root / block.path
        texts[path] = _replace_block(texts.get(path) or path.read_text(encoding="utf-8"), block)
    config = root / CONFIG
    texts[config] = config_text(config.read_text(encoding="utf-8"))
    return texts


def write(root: Path, *, check: bool = False) -> list[Path]:
    """Rewrite the generated files under ``root`` (``check``: only report); the files that differed."""
    stale = []
    for path, text in generated(root).items():
        if path.read_text(encoding="utf-8") != text:
            stale.append(path)
            if not check:
                atomic_write_text(path, text)
    return stale
