"""StructVPR end to end on real shared data, in bounded time: ESPNetv2 segmentation -> SLME -> Stage I
(both branches) -> partition -> Stage II -> export -> load the deployed student alone."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import torch

from vpr_ros.core.images import load_image
from vpr_ros.core.models import load_model, read_checkpoint


def tiny_config(kitti_dir, shared_dir, tmp_path) -> dict:
    stage = {"steps": 3, "lr": 1e-4, "batch_size": 2}
    return {
        "places": {"kind": "kitti", "root": str(kitti_dir), "train_sequence": "05", "test_sequence": "00",
                   "every": 6, "pos_radius_m": 9.0, "neg_radius_m": 20.0, "exclude_frames": 2,
                   "max_train_queries": 16, "test_step": 30, "test_offsets": [15], "test_radius_m": 12.0},
        "data": {"root": "-", "negatives": 2, "mining": "hard", "mining_pool": 8},
        "degradation": {"specs": ["none", "jpeg:10"], "targets": "query"},
        "input_size": [64, 192],
        "segmentation": {"source": "espnetv2", "width": 256, "cache_dir": str(tmp_path / "labels"),
                         "weights": str(shared_dir / "weights/espnetv2_s_2.0_city_1024x512.pth")},
        "rgb_stage1": stage, "seg_stage1": {**stage, "lr": 1e-3}, "stage2": {**stage, "kd_weight": 1.0},
        "eval_degradations": ["none"],
        "dir": str(tmp_path / "run"), "threads": 1, "progress": False, "log_every": 1,
    }


def test_structvpr_end_to_end(kitti_dir, shared_dir, torch_home, tmp_path):
    from vpr_ros.training.methods.structvpr.pipeline import StructVPR, config_from_dict

    t0 = time.perf_counter()
    sv = StructVPR(config_from_dict(tiny_config(kitti_dir, shared_dir, tmp_path)))
    deployed = tmp_path / "student.pt"
    result = sv.run(export_to=deployed)
    elapsed = time.perf_counter() - t0

    # every stage ran and left its checkpoint; the seg-branch saw real segmentation
    run = tmp_path / "run"
    for stage in ("stage1_rgb", "stage1_seg", "stage2"):
        assert (run / stage / "last.pt").is_file() and (run / stage / "summary.json").is_file()
    assert len(list((tmp_path / "labels").rglob("*.png"))) >= len(sv.train_places.database)
    seg_meta = read_checkpoint(run / "stage1_seg" / "last.pt")
    assert seg_meta["model"]["name"] == "structvpr_segbranch" and seg_meta["model"]["descriptor_dim"] == 480
    part = json.loads((run / "partition.json").read_text())
    assert part["pairs"] > 0 and abs(sum(part["shares"].values()) - 1.0) < 1e-9
    assert set(result["test"]) == {"none"} and 0.0 <= result["test"]["none"][1] <= 1.0

    # the deployed file is the plain RGB student: no seg-branch, no T, loads and runs alone
    ckpt = read_checkpoint(deployed)
    assert ckpt["kind"] == "deployed" and ckpt["model"]["name"] == "structvpr_mobilenetv2"
    assert ckpt["meta"]["method"] == "structvpr"
    assert all(k.startswith("features.") for k in ckpt["state_dict"])
    assert "kd_proj" not in ckpt and "optimizer" not in ckpt
    model = load_model(deployed)
    image = load_image(kitti_dir / "00" / "image_0" / "000123.jpg")
    from vpr_ros.core.extract import DescriptorExtractor

    d = DescriptorExtractor(model, device="cpu")([image])
    assert d.shape == (1, 448) and np.isclose(np.linalg.norm(d), 1.0, atol=1e-4)
    assert elapsed < 90, f"end-to-end run took {elapsed:.0f} s"

    # each stage ran on the engine's loop: resumable training checkpoints that describe the stage
    s2 = read_checkpoint(run / "stage2" / "last.pt")
    assert {"optimizer", "scheduler", "rng", "kd_proj", "structvpr_config"} <= set(s2)
    assert s2["meta"]["method"] == "structvpr" and s2["meta"]["stage"] == "stage2" and s2["step"] == 3
    assert s2["meta"]["weighting"]["partition"] == "gp-d" and seg_meta["meta"]["stage"] == "stage1_seg"
    # a stage without summary.json (killed) resumes from its last.pt: here to a later final step
    (run / "stage2" / "summary.json").unlink()
    cfg = tiny_config(kitti_dir, shared_dir, tmp_path)
    cfg["stage2"]["steps"] = 5
    StructVPR(config_from_dict(cfg)).stage2()
    rows = (run / "stage2" / "train.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4", "5"]
    resumed = read_checkpoint(run / "stage2" / "last.pt")
    # the restored cosine schedule (with its total of 3 steps) is at learning rate 0, so T stays exactly as
    # checkpointed: restored, not re-initialised
    assert resumed["step"] == 5 and torch.equal(resumed["kd_proj"]["weight"], s2["kd_proj"]["weight"])

    # Stage II logs the groups of the tuples it drew (pairs sampling: every (q, p) pair is an item)
    summary = json.loads((run / "stage2" / "summary.json").read_text())
    assert summary["sampling"] == "pairs" and summary["init"] == "imagenet" and summary["t_init"] == "random"
    hist = summary["group_histogram"]
    assert sum(sum(h.values()) for h in hist.values()) == 5 * 2  # 5 steps of 2 tuples
    assert all(h["none"] == 0 for h in hist.values()), "every drawn pair belongs to a group"


def test_stage2_initialisation(kitti_dir, shared_dir, torch_home, tmp_path):
    """The Stage II student starts from ImageNet (the paper); ``stage2.init: rgb-branch`` from the Stage-I
    rgb-branch. One step at a vanishing learning rate leaves the starting weights in the checkpoint."""
    from vpr_ros.core.models import create_model
    from vpr_ros.training.methods.structvpr.pipeline import StructVPR, config_from_dict, load_trained

    cfg = tiny_config(kitti_dir, shared_dir, tmp_path)
    sv = StructVPR(config_from_dict(cfg))
    sv.stage1_seg(), sv.stage1_rgb()
    imagenet = dict(create_model("structvpr_mobilenetv2", pretrained=True).named_parameters())
    rgb_branch = dict(load_trained(tmp_path / "run" / "stage1_rgb").named_parameters())
    for init, start, other in (("imagenet", imagenet, rgb_branch), ("rgb-branch", rgb_branch, imagenet)):
        cfg["stage2"] = {"steps": 1, "lr": 1e-12, "batch_size": 2, "init": init}
        run = StructVPR(config_from_dict(cfg)).stage2(f"stage2_{init}")
        got = dict(load_trained(run).named_parameters())
        assert all(torch.allclose(got[k], start[k], atol=1e-6) for k in start), init
        assert not all(torch.allclose(got[k], other[k], atol=1e-6) for k in other), init


def test_deployed_student_needs_no_training_code(tmp_path):
    """A fresh interpreter loads and runs the exported student without importing vpr_ros.training."""
    from vpr_ros.core.models import create_model, save_checkpoint

    path = save_checkpoint(create_model("structvpr_mobilenetv2"), tmp_path / "s.pt")
    code = ("import sys, numpy as np; from vpr_ros.core.models import load_model; "
            "from vpr_ros.core.extract import DescriptorExtractor; "
            f"m = load_model({str(path)!r}); "
            "d = DescriptorExtractor(m, device='cpu')([np.zeros((64, 64, 3), np.uint8)]); "
            "assert d.shape == (1, 448); "
            "assert not any(n.startswith('vpr_ros.training') for n in sys.modules), 'training imported'; "
            "assert not any('segmentation' in n for n in sys.modules if n.startswith('vpr_ros')); "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout
