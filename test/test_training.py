"""LoQI training on real Nordland images: loss goes down, run -> checkpoint -> export -> load_model,
resume after a real SIGKILL, a 2-process torchrun (gloo) run, and clear errors before training starts."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from vpr_ros.core.errors import ConfigError, DatasetError, ModelError
from vpr_ros.core.models import create_model, load_model, read_checkpoint, save_checkpoint
from vpr_ros.core.models.registry import Preprocess
from vpr_ros.training import config_from_dict, export_deployed, train
from vpr_ros.training.data import Degrader, TupleDataset, nordland_places
from vpr_ros.training.methods.loqi import LoQI, LoQITrainer, build_branches

REPO = Path(__file__).resolve().parents[1]


def tiny_recipe(root: Path, run_dir: Path, **schedule) -> dict:
    """Nordland's first 600 places (validation: frames 200-299), 32x64 input, 2 tuples of 4 images a step."""
    return {
        "data": {
            "kind": "nordland",
            "root": str(root),
            "limit": 600,
            "negatives": 2,
            "mining": "random",
            "max_train_queries": 48,
            "max_val_queries": 16,
        },
        "model": {"name": "structvpr_mobilenetv2", "input_size": [32, 64], "teacher": "imagenet"},
        "degradation": {"specs": ["jpeg:10"]},
        "optim": {"lr": 1e-4},
        "schedule": {
            "epochs": 1,
            "max_steps": 4,
            "batch_size": 2,
            "log_every": 1,
            "val_every": 0,
            "ckpt_every": 2,
            **schedule,
        },
        "run": {"dir": str(run_dir), "progress": False, "tensorboard": False, "val_batch_size": 128},
    }


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _csv_steps(path: Path) -> list[int]:
    with open(path, newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_real_steps_reduce_the_loss(nordland_dir, torch_home):
    torch.manual_seed(0)
    cfg = config_from_dict(tiny_recipe(nordland_dir, Path("unused")))
    train_p, _ = nordland_places(nordland_dir, limit=600).split_by_place(cfg.data.split)
    student, teacher = build_branches(cfg.model)
    data = TupleDataset(
        train_p.with_positive_queries(8),
        preprocess=student.preprocess,
        degrader=Degrader(["jpeg:10"]),
        negatives=2,
        seed=0,
    )
    batch = torch.utils.data.default_collate([data[i] for i in range(4)])
    method = LoQI(student, teacher, cfg.loss).train()
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=3e-4)
    losses = []
    for _ in range(6):
        out = method(batch["hq"], batch["lq"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[0] > 0.1 and losses[-1] < 0.8 * losses[0], losses


def test_run_checkpoint_export_load(nordland_dir, torch_home, tmp_path):
    cfg = config_from_dict(tiny_recipe(nordland_dir, tmp_path / "run"))
    result = train(cfg)
    run = tmp_path / "run"
    assert result.steps == 4 and (run / "config.yaml").is_file() and (run / "summary.json").is_file()
    assert config_from_dict(yaml.safe_load((run / "config.yaml").read_text())) == cfg
    assert _csv_steps(run / "train.csv") == [1, 2, 3, 4] and _csv_steps(run / "val.csv") == [4]
    assert set(result.metrics) >= {"R@1", "R@5", "teacher_db/R@1"}
    ckpt = read_checkpoint(run / "last.pt")  # weights_only=True
    assert (
        ckpt["kind"] == "training" and ckpt["step"] == 4 and ckpt["config"]["model"]["input_size"] == [32, 64]
    )
    assert {"optimizer", "scheduler", "rng"} <= set(ckpt)
    out = export_deployed(run / "last.pt", tmp_path / "deployed.pt", sidecar=True)
    assert read_checkpoint(out)["kind"] == "deployed" and "optimizer" not in read_checkpoint(out)
    assert (tmp_path / "deployed.json").is_file()
    deployed = load_model(out)
    trained = load_model(run / "last.pt")
    assert deployed.preprocess.input_size == (32, 64)
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        assert torch.allclose(deployed(x), trained(x))
    with pytest.raises(ModelError, match="expected a training checkpoint"):
        export_deployed(out, tmp_path / "again.pt")
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        train(cfg)


def test_resume_after_sigkill(nordland_dir, torch_home, tmp_path):
    run = tmp_path / "run"
    recipe = tiny_recipe(nordland_dir, run, max_steps=24, ckpt_every=2)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "vpr_ros.cli", "train", "--config", str(tmp_path / "r.yaml")]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt, deadline = run / "last.pt", time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.is_file() and read_checkpoint(ckpt)["step"] >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    killed_at = read_checkpoint(ckpt)["step"]
    assert 2 <= killed_at < 24
    done = subprocess.run([*cmd, "--resume"], env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {ckpt} at step {killed_at}" in done.stderr
    final = read_checkpoint(ckpt)
    assert final["step"] == final["total_steps"] == 24
    assert _csv_steps(run / "train.csv") == list(range(1, 25))  # no step lost or logged twice
    assert load_model(ckpt).descriptor_dim == 448


@pytest.mark.slow
def test_torchrun_two_processes_gloo(nordland_dir, torch_home, tmp_path):
    run = tmp_path / "ddp"
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(tiny_recipe(nordland_dir, run, max_steps=2, log_every=1)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(_env(), MASTER_ADDR="127.0.0.1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "vpr_ros.cli",
        "train",
        "--config",
        str(tmp_path / "d.yaml"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    for rank in (0, 1):
        assert f"[rank {rank}/2] step 2 loss" in log and f"[rank {rank}/2] finished: 2 steps" in log
    assert read_checkpoint(run / "last.pt")["step"] == 2
    assert _csv_steps(run / "train.csv") == [1, 2]  # rank 0 alone writes


def test_errors_before_training(nordland_dir, torch_home, tmp_path):
    def run_with(tmp: str, **changes):
        recipe = tiny_recipe(nordland_dir, tmp_path / tmp)
        for key, value in changes.items():
            section, name = key.split("__")
            recipe[section][name] = value
        with pytest.raises((DatasetError, ModelError, ConfigError)) as exc:
            train(config_from_dict(recipe))
        assert not (tmp_path / tmp / "last.pt").exists()
        return str(exc.value)

    assert "missing folder" in run_with("a", data__root=str(tmp_path / "no_such_dataset"))
    assert "change data.split" in run_with("b", data__limit=90)  # all places in block 0: no validation
    gem = save_checkpoint(create_model("gem_mobilenetv2"), tmp_path / "gem.pt")
    assert "holds model 'gem_mobilenetv2'" in run_with("c", model__teacher=str(gem))
    with pytest.raises(ConfigError, match="cannot resume"):
        train(config_from_dict(tiny_recipe(nordland_dir, tmp_path / "d")), resume=True)
    broken = tmp_path / "images"
    (broken / "summer").mkdir(parents=True)
    (broken / "winter").mkdir()
    assert "no images" in run_with("e", data__root=str(broken))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**tiny_recipe(nordland_dir, tmp_path / "f"), "optimizer": {"lr": 1}}))
    done = subprocess.run(
        [sys.executable, "-m", "vpr_ros.cli", "train", "--config", str(bad)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "unknown config key 'optimizer'" in done.stderr


def test_preprocess_of_training_is_fixed_size():
    with pytest.raises(DatasetError, match="fixed model input size"):
        TupleDataset.__init__(
            object.__new__(TupleDataset),
            None,
            preprocess=Preprocess(input_size=None),
            degrader=Degrader(["none"]),
        )


def test_tuples_are_seeded_and_hard_mining_picks_the_closest(nordland_dir):
    train_p, val_p = nordland_places(nordland_dir, limit=600).split_by_place(
        config_from_dict(tiny_recipe(nordland_dir, Path("unused"))).data.split
    )
    assert not {r.frame_index for r in val_p.queries} & {r.frame_index for r in train_p.database}
    data = TupleDataset(
        train_p,
        preprocess=Preprocess(input_size=(32, 64)),
        negatives=3,
        seed=7,
        pool=16,
        degrader=Degrader(["jpeg:10", "jpeg:30"]),
    )
    a, b = data[3], data[3]
    assert torch.equal(a["lq"], b["lq"]) and torch.equal(a["hq"], b["hq"])
    qi, p, negs, _ = data.tuple_ids(3)
    frame = train_p.queries[qi].frame_index
    assert abs(train_p.database[p].frame_index - frame) <= 2
    assert all(abs(train_p.database[n].frame_index - frame) > 10 for n in negs)
    data.set_epoch(1)
    assert not torch.equal(data[3]["lq"], a["lq"])  # another epoch, another draw
    # with a cache, the negatives are the most similar of the candidate pool
    rng = torch.Generator().manual_seed(0)
    q_desc = torch.nn.functional.normalize(torch.randn(len(train_p.queries), 8, generator=rng), dim=1).numpy()
    db_desc = torch.nn.functional.normalize(
        torch.randn(len(train_p.database), 8, generator=rng), dim=1
    ).numpy()
    data.set_cache(q_desc, db_desc)
    qi, p, negs, _ = data.tuple_ids(3)
    pos = train_p.positives()[qi]
    assert p == pos[(db_desc[pos] @ q_desc[qi]).argmax()]
    sims = db_desc[negs] @ q_desc[qi]
    assert list(sims) == sorted(sims, reverse=True) and len(set(negs.tolist())) == 3


def _csv_losses(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(r[k]) for k in ("loss", "ickd", "mse", "triplet")} for r in csv.DictReader(f)]


def test_teacher_cache_trains_to_the_same_losses(nordland_dir, torch_home, tmp_path):
    """loss.cache_teacher: the same loss values step by step as computing the teacher every step; with 6
    training queries and 2 tuples a step, epoch 2 re-draws the queries and the cache serves them.

    SGD: Adam turns float rounding in near-zero gradients into full-size updates, so Adam runs drift
    apart from step 3 on (by ~1e-4 here) exactly as an uncached run does on 2 threads instead of 1
    (by ~3e-3 from step 2); SGD shows that the cached teacher outputs are the computed ones."""
    runs = {}
    for cache in (False, True):
        recipe = tiny_recipe(nordland_dir, tmp_path / f"cache_{cache}", max_steps=6, ckpt_every=6)
        recipe["data"]["max_train_queries"] = 6
        recipe["schedule"]["epochs"] = 2
        recipe["optim"]["name"] = "sgd"
        recipe["loss"] = {"cache_teacher": cache}
        trainer = LoQITrainer(config_from_dict(recipe))
        try:
            trainer.run()
        finally:
            trainer.close()
        losses = _csv_losses(tmp_path / f"cache_{cache}" / "train.csv")
        runs[cache] = (losses, trainer.objective.teacher_cache)
    (plain, none), (cached, cache) = runs[False], runs[True]
    assert none is None and len(plain) == len(cached) == 6
    for step, (a, b) in enumerate(zip(plain, cached, strict=True), 1):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), (step, k)
    # 6 steps x 2 tuples x 4 images; the 6 queries (at least) came back in epoch 2
    assert cache.hits >= 6 and cache.misses == len(cache) == 6 * 2 * 4 - cache.hits

    class Augmented(TupleDataset):
        deterministic_hq = False

    class AugmentedTrainer(LoQITrainer):
        def build_dataset(self):
            d = self.cfg.data
            return Augmented(self.train_places, preprocess=self.student.preprocess, degrader=self.degrader,
                             negatives=d.negatives, seed=0)

    recipe = tiny_recipe(nordland_dir, tmp_path / "augmented")
    recipe["loss"] = {"cache_teacher": True}
    with pytest.raises(ConfigError, match="deterministic high-quality"):
        AugmentedTrainer(config_from_dict(recipe))


def test_gem_model_trains_and_exports(nordland_dir, torch_home, tmp_path):
    """Model-agnostic: the same recipe on the GeM head (one latent map, descriptor by a second pass)."""
    recipe = tiny_recipe(nordland_dir, tmp_path / "gem", max_steps=2)
    recipe["model"]["name"] = "gem_mobilenetv2"
    result = train(config_from_dict(recipe))
    assert result.steps == 2 and result.metrics["R@10"] >= 0
    model = load_model(export_deployed(tmp_path / "gem" / "last.pt", tmp_path / "gem.pt"))
    assert model.name == "gem_mobilenetv2" and model.descriptor_dim == 320
