"""The one YAML loader (vpr_ros.core.config_file): its one-line errors, values and env expansion."""

from __future__ import annotations

import pytest

from vpr_ros.core.config_file import expand_env, load_yaml, parse_value
from vpr_ros.core.errors import ConfigError


def test_load_yaml_reads_a_mapping_and_an_empty_file(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("localizer:\n  ros__parameters:\n    top_k: 3\n", encoding="utf-8")
    assert load_yaml(good, what="params file") == {"localizer": {"ros__parameters": {"top_k": 3}}}
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    assert load_yaml(empty, what="params file") == {}


def test_load_yaml_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load_yaml(missing, what="training recipe")
    msg = str(err.value)
    assert msg == f"training recipe {missing}: not found" and "\n" not in msg
    with pytest.raises(ConfigError, match="is a folder"):
        load_yaml(tmp_path, what="training recipe")


def test_load_yaml_syntax_error_names_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    # line 3 is indented one column less than line 2, so the parser stops at line 3, column 2
    bad.write_text("a:\n  b: 1\n c: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_yaml(bad, what="params file")
    msg = str(err.value)
    assert msg.startswith(f"params file {bad}: not valid YAML at line 3, column 2: ")
    assert "\n" not in msg


def test_load_yaml_top_level_must_be_a_mapping(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_yaml(listed, what="params file")
    assert str(err.value) == f"params file {listed}: the top level must be a mapping of keys, not a list"


def test_parse_value_reads_yaml_scalars_and_lists():
    assert parse_value("3", where="x") == 3
    assert parse_value("true", where="x") is True
    assert parse_value("[1, 2]", where="x") == [1, 2]
    assert parse_value("  ", where="x") == ""
    with pytest.raises(ConfigError, match=r"^--set a\.b: value '\[1,' is not valid YAML \(line 1, column 4"):
        parse_value("[1,", where="--set a.b")


def test_expand_env_defaults_and_missing(monkeypatch):
    monkeypatch.delenv("VPR_TEST_UNSET", raising=False)
    monkeypatch.setenv("VPR_TEST_SET", "/mnt/s")
    monkeypatch.setenv("VPR_TEST_EMPTY", "")
    assert expand_env("${VPR_TEST_UNSET:-../shared}/data") == "../shared/data"
    assert expand_env("${VPR_TEST_SET:-../shared}/data") == "/mnt/s/data"
    assert expand_env("${VPR_TEST_EMPTY:-d}") == "d"
    with pytest.raises(ConfigError, match="^data.root: environment variable VPR_TEST_UNSET is not set"):
        expand_env("${VPR_TEST_UNSET}", where="data.root")
