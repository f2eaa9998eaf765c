"""Maps record which weights made their descriptors; the localizer refuses a map of other weights.

A map built by ``vpr-ros build-map`` (or by the localizer in map modes) stores its
``descriptor_source`` (model, weights id, input size, dimension). The localizer loads a map of
the same weights without a warning, refuses one of other weights or another input size with
the reason, and still loads a map saved before the field existed, with a warning.
"""

from __future__ import annotations

import copy
import json
import re
import shutil

import numpy as np
import pytest
import torch

from vpr_ros.core import localizer
from vpr_ros.core.errors import MapError
from vpr_ros.core.mapdb import PlaceMap
from vpr_ros.core.provenance import descriptor_source, source_mismatch, weights_id

SOURCE = {"model": "structvpr_mobilenetv2", "weights_id": "params-sha256:" + "ab" * 32,
          "input_size": [32, 64], "dim": 4}


# --------------------------------------------------------------------------- ids and records


def test_weights_id_names_the_weights_not_their_precision():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    wid = weights_id(net)
    assert re.fullmatch(r"params-sha256:[0-9a-f]{64}", wid)
    assert weights_id(copy.deepcopy(net)) == wid
    assert weights_id(copy.deepcopy(net).half()) == wid  # precision fp16 runs a half copy: same weights
    other = copy.deepcopy(net)
    with torch.no_grad():
        other[0].weight[0, 0, 0, 0] += 0.01  # one weight, well above fp16 resolution (~0.0005 at 0.3)
    assert weights_id(other) != wid
    other = copy.deepcopy(net)
    other[1].num_batches_tracked += 1  # integer buffers count too
    assert weights_id(other) != wid


def test_source_mismatch_says_what_differs():
    assert source_mismatch(SOURCE, dict(SOURCE)) is None
    why = source_mismatch(SOURCE, {**SOURCE, "weights_id": "params-sha256:" + "cd" * 32})
    assert "other weights" in why
    assert "params-sha256:abababababab" in why and "params-sha256:cdcdcdcdcdcd" in why
    why = source_mismatch(SOURCE, {**SOURCE, "input_size": "native"})
    assert "another input size" in why and "input 32x64" in why and "input native" in why


def test_map_saves_and_loads_its_descriptor_source(tmp_path):
    pmap = PlaceMap(4, model="m", descriptor_source=SOURCE)
    pmap.add(np.eye(4, dtype=np.float32))
    path = pmap.save(tmp_path / "a")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["descriptor_source"] == SOURCE
    assert PlaceMap.load(path).descriptor_source == SOURCE

    # a map saved before the field existed: loads, source unknown
    del manifest["descriptor_source"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert PlaceMap.load(path).descriptor_source is None

    manifest["descriptor_source"] = {**SOURCE, "input_size": [32]}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MapError, match=r"manifest.json is invalid: .*input_size must be \[height, width\]"):
        PlaceMap.load(path)
    with pytest.raises(MapError, match="descriptor_source must be a mapping"):
        PlaceMap(4, descriptor_source={"model": "m"})


# --------------------------------------------------------------------------- build-map and the localizer


@pytest.fixture(scope="module")
def images(nordland_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prov_images")
    for p in sorted((nordland_dir / "summer").rglob("*.png"))[:6]:
        shutil.copy(p, out / p.name)
    return out


main_output: dict[str, str] = {}


@pytest.fixture(scope="module")
def default_map(images, tmp_path_factory):
    """A map built by `vpr-ros build-map` with the packaged student."""
    import contextlib
    import io

    from vpr_ros.cli.main import main

    out = tmp_path_factory.mktemp("prov_maps") / "site"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["build-map", "--images", str(images), "--device", "cpu", "--out", str(out)]) == 0
    main_output["build"] = buf.getvalue()
    return out.with_name("site.vprmap")


def test_build_map_records_the_weights(default_map):
    from vpr_ros.core.models import resolve_model

    source = PlaceMap.load(default_map).descriptor_source
    assert source is not None
    net = resolve_model(None)  # the packaged student, as build-map resolved it
    assert source == {"model": net.name, "weights_id": weights_id(net),
                      "input_size": list(net.preprocess.input_size), "dim": int(net.descriptor_dim)}
    assert main_output["build"].count(weights_id(net)[:26]) == 1  # printed: params-sha256:<12 hex>


@pytest.fixture(scope="module")
def loc():
    """vpr_ros.core.localizer: model resolution and map opening as the localizer node does them."""
    return localizer


@pytest.fixture(scope="module")
def student(loc):
    return loc.build_extractor("default", "", "", "cpu", 4)


def test_localizer_loads_a_map_of_its_own_weights_without_warning(default_map, student, loc):
    ext, label = student
    pmap, loaded = loc.open_map(str(default_map), "localize", ext.dim, label, "flat", descriptor_source(ext))
    assert loaded and len(pmap) == 6
    assert loc.map_warning(pmap, label) is None  # (build-map maps name only the model: they warned before)


def test_localizer_refuses_a_map_of_other_weights(default_map, student, loc, torch_home):
    run_node_main = pytest.importorskip("ros_support").run_node_main  # the node part needs rclpy

    ext, _ = student
    size = "x".join(str(v) for v in ext.preprocess.input_size)
    other, other_label = loc.build_extractor("imagenet", "", size, "cpu", 4)  # same model and size
    with pytest.raises(MapError, match="descriptors were made by other weights"):
        loc.open_map(str(default_map), "localize", other.dim, other_label, "flat", descriptor_source(other))
    # the node itself: one line, exit status 2
    proc, errors = run_node_main("localizer_node", {"map_path": default_map, "weights": "imagenet",
                                               "input_size": size, "device": "cpu"}, timeout=120,
                                 TORCH_HOME=str(torch_home))
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and "other weights" in errors[0] and "Traceback" not in proc.stderr, proc.stderr


def test_localizer_refuses_another_input_size(default_map, student, loc):
    ext, label = student
    wider = {**descriptor_source(ext), "input_size": [64, 128]}
    with pytest.raises(MapError, match="another input size"):
        loc.open_map(str(default_map), "localize", ext.dim, label, "flat", wider)


def test_old_map_without_source_warns_but_loads(default_map, student, loc, tmp_path):
    ext, label = student
    old = PlaceMap.load(default_map)
    old.descriptor_source = None  # as saved before maps recorded their weights
    path = old.save(tmp_path / "old")
    pmap, loaded = loc.open_map(str(path), "localize", ext.dim, label, "flat", descriptor_source(ext))
    assert loaded and len(pmap) == 6
    warning = loc.map_warning(pmap, label)
    assert "does not record which weights made its descriptors" in warning and label in warning


def test_map_mode_records_the_weights_it_saves(student, loc, tmp_path):
    ext, label = student
    source = descriptor_source(ext)
    pmap, loaded = loc.open_map(str(tmp_path / "new"), "map", ext.dim, label, "flat", source)
    assert not loaded and pmap.descriptor_source == source
    pmap.add(np.ones((1, ext.dim), np.float32) / np.sqrt(ext.dim))
    assert PlaceMap.load(pmap.save(tmp_path / "new")).descriptor_source == source
