#!/usr/bin/env python3
"""The accuracy study of issue #8: every model x dataset x link degradation, loop closure, the results page,
and the cross-domain part (every packaged checkpoint in and out of its training domain, model cards, the
default student's gate: :mod:`vpr_ros.studies.cross_domain`).

    python scripts/accuracy_study.py                 # full study -> results/accuracy/, docs/results.md
    python scripts/accuracy_study.py --quick --out /tmp/acc   # small subset, page in OUT/results.md
    python scripts/accuracy_study.py --cross-only    # only the cross-domain part (and the model cards)

The library work is :mod:`vpr_ros.studies.accuracy`; this script
adds the one thing the core may not do (import
``vpr_ros.training``): the ``finetuned`` control, trained here when its checkpoint is not cached (LoQI
recipe ``training/loqi_nordland_jpeg10.yaml`` with the triplet loss only, initialised from the same
teacher as the packaged LoQI student, seed 0, one thread).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from vpr_ros.studies import accuracy as study  # noqa: E402
from vpr_ros.studies import cross_domain  # noqa: E402

log = logging.getLogger("accuracy_study")

RECIPE = REPO / "training" / "loqi_nordland_jpeg10.yaml"
TEACHER_RECIPE = REPO / "training" / "teacher_nordland.yaml"


def _train(recipe: Path, overrides: list[str]) -> Path:
    """Train ``recipe`` (with ``overrides``) unless its run folder has a finished summary; return last.pt."""
    import torch

    from vpr_ros.training.methods.loqi import load_config, train

    cfg = load_config(recipe, overrides)
    run_dir = Path(cfg.run.dir)
    if (run_dir / "summary.json").is_file():
        return run_dir / "last.pt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the LoQI study: reproducible, and faster than 2 on a shared CPU
    try:
        t0 = time.perf_counter()
        train(cfg, resume=(run_dir / "last.pt").is_file())
        log.info("trained %s in %.0f s", run_dir, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return run_dir / "last.pt"


def ensure_finetuned(cache: Path, teacher: str | None = None) -> tuple[Path, dict]:
    """The no-distillation control: the LoQI recipe with only the triplet loss, from the LoQI teacher.

    Teacher: ``teacher``, else the one named in the packaged student's sidecar when that file exists
    (the exact teacher of the deployed student), else ``training/teacher_nordland.yaml`` trained into
    ``cache/teacher`` (seed 0, one thread: 1000 steps, 2-7 min on 2 CPU cores). That retrained teacher is
    not the original (measured 2026-12-04: other weights, and the control from it scores other numbers,
    e.g. IE tower clean R@1 26.6 against 31.0), so keep the named teacher file when regenerating the
    page. Returns the checkpoint and its provenance.
    """
    sidecar = study.LOQI_WEIGHTS.with_suffix(".json")
    named = json.loads(sidecar.read_text()).get("teacher") if sidecar.is_file() else None
    if teacher is None and named and (REPO / named).is_file():
        teacher, source = str(REPO / named), f"the packaged LoQI student's own teacher ({named})"
    elif teacher is None:
        teacher = str(_train(TEACHER_RECIPE, [f"run.dir={cache / 'teacher'}", "run.progress=true"]))
        source = (f"the LoQI teacher retrained by {TEACHER_RECIPE.relative_to(REPO)} (seed 0, one thread), "
                  f"since the packaged student's own ({named}) is not in this checkout")
    else:
        source = f"the teacher {teacher}"
    run_dir = cache / "finetuned_triplet"
    ckpt = _train(
        RECIPE,
        [
            "loss.ickd=false",
            "loss.mse=false",
            "loss.triplet=true",
            # the packaged LoQI student was trained with the recipe's earlier triplet (random tuples,
            # Euclidean distances, mean over negatives, m = 0.3, weight 1): the control keeps that form
            "data.mining=random",
            "loss.triplet_distance=euclidean",
            "loss.triplet_negatives=mean",
            "loss.margin=0.3",
            "loss.beta=1.0",
            f"model.teacher={teacher}",
            "model.init=teacher",
            f"run.dir={run_dir}",
            "run.progress=true",
        ],
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    info = {
        "checkpoint": str(ckpt),
        "teacher": source,
        "recipe": str(RECIPE.relative_to(REPO)),
        "losses": "triplet only",
        "steps": summary.get("steps"),
        "train_seconds": summary.get("train_seconds"),
        "validation": summary.get("metrics"),
    }
    return ckpt, info


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="small subset: 3 datasets, 5 links, 2 models (< 1 min)"
    )
    p.add_argument("--out", type=Path, default=None, help="raw results and caches (default results/accuracy)")
    p.add_argument(
        "--page",
        type=Path,
        default=None,
        help="results page to write (default docs/results.md; --quick: OUT/results.md)",
    )
    p.add_argument(
        "--shared", type=Path, default=None, help="shared data folder (default $VPR_ROS_SHARED or ../shared)"
    )
    p.add_argument("--models", default=None, help=f"comma list of {', '.join(study.MODEL_KEYS)}")
    p.add_argument("--datasets", default=None, help=f"comma list of {', '.join(study.DATASET_KEYS)}")
    p.add_argument(
        "--degrade", action="append", default=None, help="link spec, repeatable (default: the study's 14)"
    )
    p.add_argument("--teacher", default=None, help="teacher checkpoint of the finetuned control")
    p.add_argument(
        "--train-cache",
        type=Path,
        default=REPO / ".cache" / "accuracy",
        help="where the finetuned control is trained and cached",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    part = p.add_mutually_exclusive_group()
    part.add_argument("--cross-only", action="store_true", help="only the cross-domain part")
    part.add_argument("--no-cross", action="store_true", help="leave out the cross-domain part")
    p.add_argument("--no-cards", action="store_true",
                   help="do not write the cross-domain numbers into the packaged checkpoints' model cards "
                   "(never written by --quick or a run on a subset of the datasets)")
    p.add_argument("--cross-backend", default="auto",
                   help="backend of the cross-domain part (auto: ONNX Runtime on CPU, torch on CUDA)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    os.environ.setdefault("TORCH_HOME", str(REPO / ".cache" / "torch"))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    cfg = study.StudyConfig.quick_preset() if args.quick else study.StudyConfig()
    if args.out:
        cfg.out = args.out
    cfg.page = args.page or ((cfg.out / "results.md") if args.quick else REPO / "docs" / "results.md")
    if args.shared:
        cfg.shared = args.shared
    if args.models:
        cfg.models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if args.datasets:
        cfg.datasets = tuple(d.strip() for d in args.datasets.split(",") if d.strip())
    if args.degrade:
        cfg.degradations = tuple(args.degrade)
    t0 = time.perf_counter()
    if not args.cross_only:
        if "finetuned" in cfg.models:
            ckpt, info = ensure_finetuned(args.train_cache, args.teacher)
            cfg.finetuned = ckpt
            cfg.finetuned_info = info
        summary = study.run_study(cfg, train_seconds=time.perf_counter() - t0)
        print(
            f"\naccuracy study done in {summary['seconds']['total'] / 60:.1f} min "
            f"({summary['cache']['described']} descriptor sets computed, {summary['cache']['reused']} reused)"
        )
        print(f"  raw results   {summary['paths']['results']}")
        print(f"  results page  {summary['paths']['page']}")
        print(f"  figures       {summary['paths']['figures']}")
    if not args.no_cross:
        full = not args.quick and set(cfg.datasets) == set(study.DATASET_KEYS)
        cx = cross_domain.CrossConfig(backend=args.cross_backend, page=cfg.page,
                                      write_cards=full and not args.no_cards)
        data = cross_domain.run_cross_domain(cfg, cx)
        print(f"\ncross-domain part done in {data['seconds'] / 60:.1f} min ({data['described']} descriptor "
              f"sets computed); cards written: {', '.join(data['cards_written']) or 'none'}")
        for key, m in data["models"].items():
            print(f"  {key:10s} gate on its out-of-domain sets: "
                  f"{'PASS' if m['gate_out_of_domain_pass'] else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
