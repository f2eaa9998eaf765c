"""Security: no pickle on files that come from elsewhere, and no writes outside configured directories.

* An AST scan of ``vpr_ros/``: every ``torch.load`` / ``load_state_dict_from_url`` / torchvision
  ``get_state_dict`` passes ``weights_only=True``; torchvision builders given weights run inside
  ``weights_only_loads()``; no pickle-family imports, no ``pickle_module=``, no
  ``np.load(allow_pickle=True)``, no ``yaml.load`` without a safe loader, no ``eval``/``exec``.
* Checkpoints, cached torchvision weights and map data files carrying a pickle ``__reduce__``
  payload are refused by every entry point, and the payload never runs.
* Paths from untrusted input stay inside their directory: ``confined_path``, the localizer's
  ``~/save_map`` service over a real graph, map manifests naming files outside the map, the
  segmentation label cache, and a training run (writes only under ``run.dir``).

docs/robustness.md ("Security") lists each place a path from input is used for writing.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vpr_ros.core.errors import ConfigError, MapError, ModelError, VprError
from vpr_ros.core.fileio import confined_path
from vpr_ros.core.localizer import build_extractor
from vpr_ros.core.mapdb import MANIFEST_NAME, PlaceMap
from vpr_ros.core.models import create_model, load_model, read_checkpoint, resolve_model, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "vpr_ros").rglob("*.py"))


# --------------------------------------------------------------------------- AST scan


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` of a Name/Attribute chain ('' for anything else)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _with_weights_only(parents: list[ast.AST]) -> bool:
    return any(
        isinstance(p, ast.With)
        and any(
            isinstance(i.context_expr, ast.Call)
            and _dotted(i.context_expr.func).endswith("weights_only_loads")
            for i in p.items
        )
        for p in parents
    )


def scan(source: str, filename: str) -> list[str]:
    """Unsafe deserialisation in ``source``: one line per finding."""
    tree = ast.parse(source, filename)
    found: list[str] = []
    torchvision_names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torchvision.models"):
            torchvision_names |= {a.asname or a.name for a in node.names}

    def visit(node: ast.AST, parents: list[ast.AST]) -> None:
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for m in mods:
                if m.split(".")[0] in {
                    "pickle",
                    "cPickle",
                    "_pickle",
                    "dill",
                    "cloudpickle",
                    "joblib",
                    "shelve",
                    "marshal",
                }:
                    found.append(f"{where}: imports {m}")
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            short = name.rsplit(".", 1)[-1]
            if (
                name in {"torch.load", "torch.serialization.load"}
                or short == "load_state_dict_from_url"
                or short == "get_state_dict"
            ):
                if not _is_const(_kw(node, "weights_only"), True):
                    found.append(f"{where}: {name}() without weights_only=True")
            if _kw(node, "pickle_module") is not None:
                found.append(f"{where}: {name}(pickle_module=...)")
            if name in {"np.load", "numpy.load"}:
                allow = _kw(node, "allow_pickle")
                if allow is not None and not _is_const(allow, False):
                    found.append(f"{where}: {name}(allow_pickle=...) not False")
            if name in {"yaml.load", "yaml.load_all"}:
                loader = _dotted(_kw(node, "Loader") or ast.Constant(None))
                if loader.rsplit(".", 1)[-1] not in {"SafeLoader", "CSafeLoader"}:
                    found.append(f"{where}: {name}() without a SafeLoader")
            if name in {"yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"}:
                found.append(f"{where}: {name}()")
            if name in {"eval", "exec"}:
                found.append(f"{where}: {name}()")
            weights = _kw(node, "weights")
            if (
                name in torchvision_names
                and weights is not None
                and not _is_const(weights, None)
                and not _with_weights_only(parents)
            ):
                found.append(f"{where}: torchvision {name}(weights=...) outside weights_only_loads()")
        for child in ast.iter_child_nodes(node):
            visit(child, [*parents, node])

    visit(tree, [])
    return found


def test_scan_finds_each_unsafe_pattern():
    """The scanner itself: every pattern it must catch, and the safe forms it must let through."""
    bad = """
import pickle
import torch, numpy as np, yaml
from torchvision.models import mobilenet_v2, MobileNet_V2_Weights
torch.load(p)
torch.load(p, weights_only=False)
torch.hub.load_state_dict_from_url(u)
MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
torch.load(p, pickle_module=pickle, weights_only=True)
np.load(p, allow_pickle=True)
yaml.load(s)
yaml.load(s, Loader=yaml.Loader)
yaml.unsafe_load(s)
eval("1")
mobilenet_v2(weights=MobileNet_V2_Weights.DEFAULT)
"""
    found = scan(bad, "bad.py")
    assert sorted(int(f.split(":")[1]) for f in found) == [2, *range(5, 16)], found  # each line once
    good = """
import torch, numpy as np, yaml
from torchvision.models import mobilenet_v2, MobileNet_V2_Weights
torch.load(p, map_location="cpu", weights_only=True)
np.load(p) ; np.load(p, allow_pickle=False)
yaml.safe_load(s) ; yaml.load(s, Loader=yaml.SafeLoader)
mobilenet_v2(weights=None)
with weights_only_loads():
    mobilenet_v2(weights=MobileNet_V2_Weights.DEFAULT)
"""
    assert scan(good, "good.py") == []


def test_no_unsafe_deserialisation_in_the_package():
    assert len(SOURCES) > 50
    found = [
        f for path in SOURCES for f in scan(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    ]
    assert found == []


# --------------------------------------------------------------------------- pickle payloads refused


class Payload:
    """Unpickling this creates ``marker`` (a directory): proof that pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture()
def evil(tmp_path) -> tuple[Path, Path]:
    """A checkpoint that is valid in every respect except a pickled ``__reduce__`` payload in its meta."""
    marker = tmp_path / "PAYLOAD_RAN"
    good = save_checkpoint(create_model("gem_mobilenetv2"), tmp_path / "good.pt")
    ckpt = torch.load(good, weights_only=True)
    ckpt["meta"]["note"] = Payload(marker)
    path = tmp_path / "evil.pt"
    torch.save(ckpt, path)
    return path, marker


def test_malicious_checkpoint_is_refused_by_every_loader(evil, tmp_path):
    path, marker = evil
    for load in (
        read_checkpoint,
        load_model,
        lambda p: resolve_model(p),
        lambda p: resolve_model(str(p), None),
    ):
        with pytest.raises(ModelError, match="(?s)not a readable vpr_ros checkpoint.*GLOBAL posix.mkdir"):
            load(path)
    from vpr_ros.training.export import export_deployed

    with pytest.raises(ModelError, match="not a readable"):
        export_deployed(path, tmp_path / "out.pt")
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_malicious_checkpoint_refused_by_cli_node_and_training(evil, tmp_path, capsys, nordland_dir):
    path, marker = evil
    from vpr_ros.cli.main import main

    assert main(["export", str(path), str(tmp_path / "o.pt")]) == 2
    assert (
        main(["build-map", "--images", str(tmp_path), "--weights", str(path), "--out", str(tmp_path / "m")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("not a readable vpr_ros checkpoint") == 2 and "Traceback" not in err
    with pytest.raises(ModelError, match="not a readable"):  # what the localizer node builds its model with
        build_extractor(str(path), "", "native", "cpu")
    from test_training import tiny_recipe

    from vpr_ros.training import config_from_dict, train

    for where in ("teacher", "init"):  # a distillation teacher or a starting point given as a checkpoint
        recipe = tiny_recipe(nordland_dir, tmp_path / f"run_{where}")
        recipe["model"][where] = str(path)
        with pytest.raises(ModelError, match="not a readable"):
            train(config_from_dict(recipe))
    run = tmp_path / "run_resume"
    run.mkdir()
    shutil.copy(path, run / "last.pt")
    with pytest.raises(ModelError, match="not a readable"):
        train(config_from_dict(tiny_recipe(nordland_dir, run)), resume=True)
    assert not marker.exists()


def test_poisoned_torchvision_cache_is_refused(tmp_path, monkeypatch):
    """torchvision's weights API unpickles its cached file (weights_only=False); the backbone and the
    segmentation plug read it with weights_only=True, so a planted file is an error, not code."""
    marker = tmp_path / "PAYLOAD_RAN"
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    for name in ("mobilenet_v2-b0353104.pth", "lraspp_mobilenet_v3_large-d234d4ea.pth"):
        torch.save({"features.0.0.weight": Payload(marker)}, cache / name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(ModelError, match="could not load torchvision's ImageNet MobileNetV2 weights"):
        create_model("structvpr_mobilenetv2", pretrained=True)
    from vpr_ros.training.methods.structvpr.segmentation import TorchvisionSegmenter

    with pytest.raises(ModelError, match="lraspp_mobilenet_v3_large"):
        TorchvisionSegmenter("lraspp_mobilenet_v3_large")
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the block restored the environment


def _rewrite_data_file(target: Path, key: str, write) -> None:
    """Replace a map data file with ``write(path)``'s output and update the manifest to match."""
    import hashlib

    manifest = json.loads((target / MANIFEST_NAME).read_text())
    path = target / manifest["files"][key]["name"]
    write(path)
    data = path.read_bytes()
    manifest["files"][key].update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (target / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_map_data_with_pickled_objects_is_refused(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    pmap = PlaceMap(8, model="m")
    pmap.add(np.eye(8, dtype=np.float32)[:3])
    target = pmap.save(tmp_path / "m")

    def evil_npz(path: Path) -> None:
        with np.load(path, allow_pickle=False) as z:
            arrays = dict(z)
        arrays["sources"] = np.array([Payload(marker)] * 3, dtype=object)
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    _rewrite_data_file(target, "entries", evil_npz)  # checksums updated: only the content is wrong
    with pytest.raises(MapError):
        PlaceMap.load(target)
    assert not marker.exists()


# --------------------------------------------------------------------------- paths stay inside


def test_confined_path(tmp_path):
    root = tmp_path / "maps"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    (root / "link_out").symlink_to(tmp_path / "outside")
    assert confined_path(root, "site") == root.resolve() / "site"
    assert confined_path(root, "a/../b/c") == root.resolve() / "b" / "c"
    assert confined_path(str(root), root / "x") == root.resolve() / "x"  # absolute, inside
    for bad in (
        "../escape",
        "a/../../escape",
        str(tmp_path / "outside" / "x"),
        "/etc/passwd",
        "link_out/x",
        ".",
        "",
        "a\x00b",
    ):
        with pytest.raises(ConfigError, match="leaves the directory|invalid path"):
            confined_path(root, bad)


@pytest.mark.ros
@pytest.mark.usefixtures("ros_env")
def test_save_map_service_cannot_write_outside_the_map_folder(tmp_path):
    """``~/save_map`` takes a path from anyone on the graph: only the folder of ``map_path`` is writable."""
    pytest.importorskip("ros_support")
    from ros_support import unique
    from vpr_ros_msgs.srv import SaveMap

    from vpr_ros.core.extract import DescriptorExtractor
    from vpr_ros.ros.localizer_node import LocalizerNode
    from vpr_ros.ros.runner import InProcessGraph

    folder, outside = tmp_path / "maps", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (folder / "link_out.vprmap").symlink_to(outside / "planted.vprmap", target_is_directory=True)
    ext = DescriptorExtractor(create_model("gem_mobilenetv2"), device="cpu")
    with InProcessGraph() as graph:
        node = graph.create(
            LocalizerNode,
            unique("localizer"),
            extractor=ext,
            label="gem_mobilenetv2@random",
            params={
                "map_path": str(folder / "site"),
                "mode": "map",
                "save_on_shutdown": False,
                "image_topic": f"/{unique('sec')}/camera",
                "diagnostics_period_s": 0.0,
            },
        )
        probe = graph.add(graph.node(unique("probe")))
        client = probe.create_client(SaveMap, f"/{node.get_name()}/save_map")
        assert graph.wait_for(client.service_is_ready, 10.0)

        def call(path: str) -> SaveMap.Response:
            future = client.call_async(SaveMap.Request(path=path))
            assert graph.wait_for(future.done, 10.0)
            return future.result()

        refused = [
            "../outside/escape",
            str(outside / "abs"),
            "/tmp/../" + str(outside / "dots")[1:],
            "link_out",
            ".",
            "sub/../../outside/x",
        ]
        for path in refused:
            res = call(path)
            assert not res.success and res.message.startswith(f"save_map: refused path {path!r}"), res.message
        allowed = {
            "": folder / "site.vprmap",
            "run2": folder / "run2.vprmap",
            str(folder / "abs_inside"): folder / "abs_inside.vprmap",
            "sub/run3": folder / "sub" / "run3.vprmap",
        }
        for path, where in allowed.items():
            res = call(path)
            assert res.success and res.message.startswith("saved 0 places to "), res.message
            assert Path(res.message.rsplit(" ", 1)[1]).resolve() == where.resolve()
            assert len(PlaceMap.load(where)) == 0
    assert sorted(p.name for p in outside.iterdir()) == []  # nothing was written outside
    assert not (tmp_path / "escape.vprmap").exists()


def test_map_manifest_cannot_name_files_outside_the_map(tmp_path):
    """Data-file names come from the manifest: ``..``, absolute paths and subfolders are refused, and
    neither loading nor saving over such a map touches the files they name."""
    victim = tmp_path / "victim.faiss"
    victim.write_bytes(b"precious")
    pmap = PlaceMap(8, model="m")
    pmap.add(np.eye(8, dtype=np.float32)[:3])
    target = pmap.save(tmp_path / "m")
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    for name in (
        "../victim.faiss",
        str(victim),
        "sub/index-deadbeef.faiss",
        "index-deadbeef.faiss/../../victim.faiss",
    ):
        manifest["files"]["index"]["name"] = name
        (target / MANIFEST_NAME).write_text(json.dumps(manifest))
        with pytest.raises(MapError, match="malformed"):
            PlaceMap.load(target)
    pmap.save(target)  # saving over it: the stale-file cleanup only looks inside the map folder
    assert victim.read_bytes() == b"precious" and len(PlaceMap.load(target)) == 3


def test_label_cache_ids_cannot_leave_the_cache(tmp_path):
    from vpr_ros.training.methods.structvpr.segmentation import LabelCache

    image = tmp_path / "frame.png"
    image.write_bytes(b"x")
    cache = LabelCache(tmp_path / "cache")
    assert cache.path(image, "tv_../../x").parent == tmp_path / "cache" / "tv_.._.._x"
    with pytest.raises(VprError, match="leaves the directory"):
        cache.path(image, "..")


def test_training_writes_only_under_run_dir(nordland_dir, torch_home, tmp_path):
    from test_training import tiny_recipe

    from vpr_ros.training import config_from_dict, train

    run = tmp_path / "runs" / "a"
    before = set(tmp_path.rglob("*"))
    train(config_from_dict(tiny_recipe(nordland_dir, run, max_steps=1)))
    written = set(tmp_path.rglob("*")) - before
    assert {run / "last.pt", run / "train.csv", run / "config.yaml"} <= written
    assert all(p == run or run in p.parents or p == run.parent for p in written), sorted(written)
