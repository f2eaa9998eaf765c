"""Node parameters are described once (each node's ``PARAMS``): the docs tables, the launch arguments and
config/localize.yaml are generated from or checked against those specs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

pytest.importorskip("rclpy")  # the specs live in the node modules

from vpr_ros.core.errors import ConfigError
from vpr_ros.ros import graph
from vpr_ros.ros import param_docs as docs

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / docs.CONFIG


def _copy(tmp_path: Path) -> Path:
    """The generated files under a fresh root (edits there leave the repository alone)."""
    for rel in {b.path for b in docs.BLOCKS} | {docs.CONFIG}:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    return tmp_path


# --------------------------------------------------------------------------- the repository is in sync


def test_every_config_value_is_a_declared_parameter_with_a_valid_value():
    data = yaml.safe_load(CONFIG.read_text())
    assert set(data) == {n.name for n in graph.NODES}, "one section per node of the graph"
    for node, body in data.items():
        specs = graph.param_specs(node)
        assert specs, f"{node}: no parameter specs"
        for key, value in body["ros__parameters"].items():
            assert key in specs, f"config {node}.{key} is not a parameter of {node}"
            assert specs[key].check(specs[key].coerce(value)) is None, (node, key, value)
    # and the graph reads it the same way (no name the node does not declare, floats widened)
    params = graph.load_params_file(CONFIG)
    assert graph.node_values("transmitter", params)["scale"] == 1.0
    assert isinstance(graph.node_values("localizer", params)["min_score"], float)


def test_docs_and_config_are_generated_from_the_specs():
    stale = [str(p.relative_to(REPO)) for p, text in docs.generated(REPO).items()
             if p.read_text(encoding="utf-8") != text]
    assert stale == [], f"out of date: {stale}; run `python scripts/gen_param_docs.py`"


def test_each_docs_table_row_is_a_spec():
    text = (REPO / "docs" / "ros.md").read_text()
    block = text[text.index("<!-- localizer-params -->"):text.index("<!-- /localizer-params -->")]
    rows = [r for r in block.splitlines() if r.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == list(graph.param_specs("localizer"))
    top_k = next(r for r in rows if r.startswith("| `top_k`"))
    assert top_k == "| `top_k` | int | `5` | [1, 100] | yes | candidates per PlaceMatch |"


def test_config_comments_come_from_the_specs():
    text = CONFIG.read_text()
    spec = graph.param_specs("localizer")["top_k"]
    assert f"    # {spec.description} (in [1, 100])\n    top_k: 5\n" in text
    # the wiring each section gets is written from graph.WIRES
    assert "#   image_topic = transmitter.output_topic (with use_transmitter, always)" in text
    assert "#   map_path = localizer.map_path (unless set here)" in text


# --------------------------------------------------------------------------- the generator finds drift


def test_a_changed_description_or_value_comment_is_found_and_rewritten(tmp_path):
    root = _copy(tmp_path)
    config = root / docs.CONFIG
    config.write_text(config.read_text().replace("# candidates per PlaceMatch (in [1, 100])",
                                                 "# how many candidates"))
    ros_md = root / "docs" / "ros.md"
    ros_md.write_text(ros_md.read_text().replace("| JPEG quality (mode jpeg) |", "| JPEG quality |", 1))
    assert sorted(docs.write(root, check=True)) == sorted([config, ros_md])
    assert "how many candidates" in config.read_text()  # check only: nothing rewritten
    assert sorted(docs.write(root)) == sorted([config, ros_md])
    assert docs.write(root, check=True) == []
    assert (root / docs.CONFIG).read_text() == CONFIG.read_text()
    # the header and the values are the file's own
    config.write_text(config.read_text().replace("top_k: 5", "top_k: 7", 1)
                      .replace("# Parameters of the vpr_ros graph", "# Parameters of our graph"))
    assert docs.write(root, check=True) == []


def test_a_config_key_or_value_the_node_does_not_accept_is_an_error(tmp_path):
    root = _copy(tmp_path)
    config = root / docs.CONFIG
    good = config.read_text()
    config.write_text(good.replace("    top_k: 5\n", "    top_kk: 5\n", 1))
    with pytest.raises(ConfigError, match="localizer declares no parameter 'top_kk'"):
        docs.write(root)
    config.write_text(good.replace("    top_k: 5\n", "    top_k: 500\n", 1))
    with pytest.raises(ConfigError, match=r"'top_k' = 500 is outside \[1, 100\]"):
        docs.write(root)
    config.write_text(good.replace("transmitter:\n", "transmiter:\n", 1))
    with pytest.raises(ConfigError, match="unknown node 'transmiter'"):
        docs.write(root)
    assert config.read_text() != good  # an error writes nothing


def test_a_missing_marker_is_named(tmp_path):
    root = _copy(tmp_path)
    md = root / "docs" / "loop_closure.md"
    md.write_text(md.read_text().replace("<!-- /loop-closure-params -->", ""))
    with pytest.raises(ConfigError, match="docs/loop_closure.md: no <!-- loop-closure-params -->"):
        docs.write(root)


@pytest.mark.parametrize(("value", "text"), [
    ("", '""'), ("camera/image_raw", "camera/image_raw"), ("~/.ros/vpr_ros/place_map.vprmap",
                                                             "~/.ros/vpr_ros/place_map.vprmap"),
    ("true", '"true"'), ("10", '"10"'), ("a: b", '"a: b"'), ("x #y", '"x #y"'),
    (True, "true"), (0, "0"), (16777216, "16777216"), (1.0, "1.0"), (-1000.0, "-1000.0"), (0.05, "0.05"),
])
def test_values_are_written_so_they_read_back_unchanged(value, text):
    assert docs.render_value(value) == text
    back = yaml.safe_load(text)
    assert back == value and type(back) is type(value)


# --------------------------------------------------------------------------- the specs themselves


def test_specs_are_well_formed():
    for node in graph.NODES:
        specs = graph.param_specs(node.name)
        assert specs, node.name
        for spec in specs.values():
            assert spec.description and spec.description == spec.description.strip(), (node.name, spec.name)
            assert spec.check(spec.default) is None, f"{node.name}.{spec.name}: default {spec.default!r}"
            if spec.choices:
                assert spec.type is str and spec.low is None and spec.high is None
            if spec.low is not None and spec.high is not None:
                assert spec.low <= spec.high, (node.name, spec.name)
