"""The training engine and its methods: the engine imports no method, the registry finds every recipe's
method (by its `method:` key or its sections), and every registered method trains on a tiny real fixture
through the one entry point (`vpr_ros.training.train`, what `vpr-ros train` runs)."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from vpr_ros.core.errors import ConfigError
from vpr_ros.core.models import load_model, read_checkpoint
from vpr_ros.training import train
from vpr_ros.training.methods import METHODS, export, load_recipe, method_for, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "vpr_ros"


def _module_imports(module: str) -> set[str]:
    """Modules of vpr_ros that ``module``'s source imports (module level and inside functions)."""
    path = PKG.parent / (module.replace(".", "/") + ".py")
    if not path.is_file():
        path = path.with_suffix("") / "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return {m for m in out if m.startswith("vpr_ros.") and _exists(m)}


def _exists(module: str) -> bool:
    base = PKG.parent / module.replace(".", "/")
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def test_the_engine_imports_no_method_module():
    """Neither the engine nor anything it imports (transitively, within vpr_ros) is a method module."""
    seen, todo = set(), ["vpr_ros.training.engine"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += sorted(_module_imports(m) - seen)
    assert "vpr_ros.training.config" in seen and "vpr_ros.training.data" in seen  # the walk follows imports
    assert sorted(m for m in seen if m.startswith("vpr_ros.training.methods")) == []


def test_every_recipe_names_its_registered_method_and_validates(monkeypatch):
    monkeypatch.setenv("VPR_ROS_SHARED", "/somewhere/shared")
    assert set(METHODS) == {"loqi", "general", "scicevpr", "structvpr"}
    recipes = sorted((REPO / "training").glob("*.yaml"))
    found = {}
    for path in recipes:
        raw = yaml.safe_load(path.read_text())
        method, cfg = load_recipe(path)
        assert raw["method"] == method.name and type(cfg) is method.recipe, path
        found[path.stem] = method.name
    assert set(found.values()) == set(METHODS)
    assert found["teacher_nordland"] == found["loqi_nordland_jpeg10"] == "loqi"


def test_a_recipe_without_method_key_is_read_by_its_sections():
    """A run's saved config.yaml has no `method:` key: its sections say which method wrote it (a recipe
    whose sections several methods share is LoQI's)."""
    for name, method in METHODS.items():
        saved = asdict(method.recipe())
        assert method_for(saved).name == name
    assert method_for({"data": {}, "optim": {}}).name == "loqi"
    assert method_for({"optimizer": {}}).name == "loqi"  # unknown section: LoQI names the bad key
    with pytest.raises(ConfigError, match="unknown config key 'optimizer'"):
        recipe_from_dict({"optimizer": {}})


def test_method_key_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"method: 'dino' is not one of loqi, general, scicevpr, structvpr"):
        recipe_from_dict({"method": "dino"})
    with pytest.raises(ConfigError, match="the recipe names 'general', it is read as a 'loqi' recipe"):
        METHODS["loqi"].config({"method": "general"})


@pytest.mark.parametrize("module", ["vpr_ros.training.methods.general", "vpr_ros.training.methods.scicevpr",
                                    "vpr_ros.training.methods.structvpr.pipeline"])
def test_old_method_entry_points_name_the_new_command(module):
    out = subprocess.run([sys.executable, "-m", module, "train", "--config", "x.yaml"], capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert out.returncode == 1
    assert "moved: use `vpr-ros train" in out.stderr and "Traceback" not in out.stderr


# --------------------------------------------------------------------------- one step of every method


def _loqi(tmp_path: Path, nordland_dir: Path, **_) -> dict:
    from test_training import tiny_recipe

    return {"method": "loqi", **tiny_recipe(nordland_dir, tmp_path / "run", max_steps=1, ckpt_every=1)}


def _general(tmp_path: Path, **_) -> dict:
    from test_general_student import _images

    from vpr_ros.core.models import create_model, save_checkpoint

    teacher = create_model("structvpr_mobilenetv2", pretrained=False, preprocess={"input_size": [64, 64]})
    return {
        "method": "general",
        "data": {"sources": [{"kind": "images", "root": str(_images(tmp_path / "img")), "domain": "lab"}],
                 "draws": 1, "val_every": 4, "store": str(tmp_path / "store")},
        "model": {"input_size": [64, 64], "teacher": str(save_checkpoint(teacher, tmp_path / "t.pt")),
                  "crop": [32, 48]},
        "schedule": {"max_steps": 1, "batch_size": 4, "log_every": 1, "ckpt_every": 1},
        "run": {"dir": str(tmp_path / "run"), "progress": False, "tensorboard": False, "device": "cpu"},
    }


def _scicevpr(tmp_path: Path, **_) -> dict:
    from test_scicevpr import _recipe, _synthetic_places

    _synthetic_places(tmp_path / "places")
    recipe = _recipe(tmp_path, "teacher")
    recipe["schedule"]["max_steps"] = 1
    recipe["run"]["dir"] = str(tmp_path / "run")
    return {"method": "scicevpr", **recipe}


def _structvpr(tmp_path: Path, kitti_dir: Path, shared_dir: Path, **_) -> dict:
    from test_structvpr_pipeline import tiny_config

    recipe = tiny_config(kitti_dir, shared_dir, tmp_path)
    for stage in ("rgb_stage1", "seg_stage1", "stage2"):
        recipe[stage]["steps"] = 1
    return {"method": "structvpr", **recipe}


RECIPES = {"loqi": _loqi, "general": _general, "scicevpr": _scicevpr, "structvpr": _structvpr}


def test_every_registered_method_has_a_one_step_fixture():
    assert set(RECIPES) == set(METHODS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_method_trains_one_step_through_the_one_entry_point(
    name, tmp_path, nordland_dir, kitti_dir, shared_dir, torch_home
):
    raw = RECIPES[name](tmp_path, nordland_dir=nordland_dir, kitti_dir=kitti_dir, shared_dir=shared_dir)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    method, cfg = load_recipe(tmp_path / "recipe.yaml")
    assert method.name == name
    result = train(cfg)
    assert result.steps == 1
    ckpt = read_checkpoint(result.checkpoint)  # weights_only loading
    assert ckpt["kind"] == "training" and ckpt["meta"]["method"] == name and ckpt["step"] == 1
    assert {"optimizer", "scheduler", "rng", "config"} <= set(ckpt)
    rows = (result.run_dir / "train.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("1,")
    if name != "structvpr":  # a StructVPR stage saves its stage recipe; the whole recipe is in the checkpoint
        assert load_recipe(result.run_dir / "config.yaml")[0].name == name  # config.yaml reads back
    else:
        assert ckpt["structvpr_config"]["dir"] == raw["dir"]
    out = export(result.checkpoint, tmp_path / "student.pt")
    deployed = read_checkpoint(out)
    assert deployed["kind"] == "deployed" and deployed["meta"]["method"] == name
    assert load_model(out).descriptor_dim == ckpt["model"]["descriptor_dim"]
