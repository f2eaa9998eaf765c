"""The LoQI ablation study: regenerate the recall table of every loss combination on one place split.

    vpr-ros study loqi-ablation --out results/loqi [--recipe training/loqi_nordland_jpeg10.yaml]

1. the teacher: no VPR-trained weights can be had here, so an ImageNet model is first fine-tuned for
   place recognition on high-quality images with the triplet loss (``--teacher-recipe``, same split),
   unless ``--teacher CKPT`` names one;
2. baselines on the held-out places with degraded queries: the ImageNet model without any training and
   the teacher (fine-tuned without distillation), plus both on high-quality queries for reference;
3. one student per loss combination (``--variants``), each initialised from the teacher and trained by
   the recipe with only its losses switched on: ``triplet`` alone is fine-tuning on low-quality images
   without distillation;
4. with ``--options``, the full loss (ICKD+MSE+triplet) once more per named earlier form of a term
   (:data:`OPTIONS`: random tuples and the plain triplet, ICKD on every map, the summed MSE's weight), to
   measure what the paper's form changed;
5. ``table.md``, ``results.json`` and ``recall.png`` in ``--out``; ``--install PATH`` exports the best
   student (validation R@1) as deployed weights with a JSON sidecar.

``--balance`` only prints the unweighted loss terms of the teacher-initialised student over a few batches
and the alpha / beta that make the weighted terms equal there (how the recipe's weights were chosen).

Runs live in ``OUT/runs/<name>``; a finished run is reused and an interrupted one resumed, so the
study can be re-run after a stop and only does what is missing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vpr_ros.core.errors import ConfigError
from vpr_ros.core.fileio import atomic_write_text
from vpr_ros.core.models import create_model, load_model, select_device
from vpr_ros.eval.metrics import EvalResult, save_results_json
from vpr_ros.eval.plots import plot_recall_curves
from vpr_ros.training.data import Degrader, TupleDataset, build_places, degrade_queries
from vpr_ros.training.evaluate import describe, evaluate_model
from vpr_ros.training.export import export_deployed
from vpr_ros.training.methods.loqi import (
    LoQI,
    TrainConfig,
    build_branches,
    config_from_dict,
    forward_outputs,
    train,
)

log = logging.getLogger("vpr_ros.studies.loqi_ablation")

#: loss combinations of the paper's ablation (ickd, mse, triplet)
VARIANTS: dict[str, tuple[bool, bool, bool]] = {
    "triplet": (False, False, True),
    "ickd": (True, False, False),
    "mse": (False, True, False),
    "ickd+mse": (True, True, False),
    "ickd+triplet": (True, False, True),
    "mse+triplet": (False, True, True),
    "ickd+mse+triplet": (True, True, True),
}

#: earlier forms of the terms, each a set of recipe overrides applied to the full loss (ickd+mse+triplet)
OPTIONS: dict[str, dict[str, Any]] = {
    # random positive and negatives, Euclidean distances, mean over negatives, m = 0.3 (what the authors'
    # code computes up to its batch sum: TripletMarginLoss with margin sqrt(0.1) = 0.32, mean over pairs)
    "plain-triplet": {
        "data.mining": "random",
        "loss.triplet_distance": "euclidean",
        "loss.triplet_negatives": "mean",
        "loss.margin": 0.3,
    },
    "ickd-all-maps": {"loss.ickd_maps": [0, 1, 2]},  # every StructVPR stage instead of z
    # the summed MSE at weight 1 is the per-element mean at weight D = 448 (StructVPR's descriptor)
    "mse-sum": {"loss.mse_reduction": "sum", "loss.alpha": 1.0},
}


def _run(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``cfg`` unless its run directory already has a finished summary; resume when interrupted."""
    run_dir = Path(cfg.run.dir)
    summary = run_dir / "summary.json"
    if summary.is_file():
        log.info("reusing finished run %s", run_dir)
        return json.loads(summary.read_text())
    train(cfg, resume=(run_dir / "last.pt").is_file())
    return json.loads(summary.read_text())


def _row(name: str, kind: str, metrics: dict[str, float], ns: Sequence[int], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        **{f"R@{n}": metrics.get(f"R@{n}") for n in ns},
        **{f"teacher_db/R@{n}": metrics.get(f"teacher_db/R@{n}") for n in ns},
        **extra,
    }


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def markdown_table(rows: list[dict[str, Any]], ns: Sequence[int], *, title: str) -> str:
    """The study table in Markdown."""
    head = [
        "model",
        "losses",
        "queries",
        *(f"R@{n}" for n in ns[:2]),
        *(f"R@{n} (teacher db)" for n in ns[:2]),
        "train steps",
        "train time",
    ]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t = r.get("train_seconds")
        cells = [
            r["name"],
            r.get("losses", "-"),
            r.get("queries", "-"),
            *(_pct(r.get(f"R@{n}")) for n in ns[:2]),
            *(_pct(r.get(f"teacher_db/R@{n}")) for n in ns[:2]),
            "-" if r.get("steps") is None else str(r["steps"]),
            "-" if t is None else f"{t / 60:.1f} min",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _check_names(kind: str, names: Sequence[str], known: dict[str, Any]) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown {kind}(s) {', '.join(unknown)}; choose from {', '.join(known)}")


def run_study(
    recipe: TrainConfig,
    out: str | Path,
    *,
    teacher_recipe: TrainConfig | None = None,
    teacher: str | None = None,
    variants: Sequence[str] = tuple(VARIANTS),
    options: Sequence[str] = (),
    install: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Run the study (see the module docstring) and return its rows.

    ``variants`` are keys of :data:`VARIANTS`, ``options`` keys of :data:`OPTIONS` (ConfigError otherwise).
    """
    _check_names("variant", variants, VARIANTS)
    _check_names("option", options, OPTIONS)
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    ns = recipe.run.recall_ns
    rows: list[dict[str, Any]] = []
    # 1. teacher
    teacher_seconds = teacher_steps = None
    if teacher is None:
        if teacher_recipe is None:
            raise ValueError("give a teacher checkpoint or a teacher recipe")
        teacher_recipe.run.dir = str(out / "runs" / "teacher")
        t_summary = _run(teacher_recipe)
        teacher = str(Path(teacher_recipe.run.dir) / "last.pt")
        teacher_seconds, teacher_steps = t_summary["train_seconds"], t_summary["steps"]
    # 2. baselines on the recipe's validation split
    _, val = build_places(recipe.data).split_by_place(recipe.data.split)
    val = val.with_positive_queries(recipe.data.max_val_queries)
    degrader = Degrader(recipe.degradation.specs)
    device = select_device(recipe.run.device)
    lq = degrade_queries(val, degrader, seed=recipe.run.seed)
    hq = [q.load() for q in val.queries]
    size = recipe.model.input_size
    imagenet = create_model(recipe.model.name, pretrained=True, **recipe.model.config)
    if size:
        imagenet.preprocess = dataclasses.replace(imagenet.preprocess, input_size=tuple(size))
    teacher_model = load_model(teacher)
    bs = recipe.run.val_batch_size
    for label, model, note, short in (
        ("ImageNet MobileNetV2 (no VPR training)", imagenet, "-", "ImageNet"),
        (
            "teacher: fine-tuned on HQ, no distillation",
            teacher_model,
            "triplet (HQ)",
            "teacher (no distillation)",
        ),
    ):
        db = None
        for qname, queries in ((degrader.label, lq), ("none (HQ reference)", hq)):
            rec, db = evaluate_model(model, val, queries, db_desc=db, device=device, batch_size=bs, ns=ns)
            metrics = {f"R@{n}": rec[n] for n in ns}
            rows.append(
                _row(
                    f"{label} [queries {qname}]",
                    "baseline",
                    metrics,
                    ns,
                    losses=note,
                    queries=qname,
                    short=short,
                    queries_n=rec.n_queries,
                    train_seconds=teacher_seconds if model is teacher_model else None,
                    steps=teacher_steps if model is teacher_model else None,
                )
            )
    # 3. students
    for name in variants:
        ickd, mse, trip = VARIANTS[name]
        cfg = load_config_copy(recipe)
        cfg.loss.ickd, cfg.loss.mse, cfg.loss.triplet = ickd, mse, trip
        cfg.model.teacher, cfg.model.init = teacher, "teacher"
        cfg.run.dir = str(out / "runs" / name.replace("+", "_"))
        t0 = time.time()
        summary = _run(cfg)
        log.info("variant %s done in %.0f s wall", name, time.time() - t0)
        label = "student: triplet on LQ, no distillation" if name == "triplet" else f"student: LoQI {name}"
        rows.append(
            _row(
                label,
                "student",
                summary["metrics"],
                ns,
                losses=name,
                queries=degrader.label,
                short="triplet only (no distillation)" if name == "triplet" else f"LoQI {name}",
                train_seconds=summary["train_seconds"],
                steps=summary["steps"],
                variant=name,
                checkpoint=summary["checkpoint"],
            )
        )
    # 4. the full loss with an earlier form of one term
    for name in options:
        cfg = load_config_copy(recipe)
        cfg.loss.ickd = cfg.loss.mse = cfg.loss.triplet = True
        for key, value in OPTIONS[name].items():
            section, field_name = key.split(".")
            setattr(getattr(cfg, section), field_name, value)
        cfg.model.teacher, cfg.model.init = teacher, "teacher"
        cfg.run.dir = str(out / "runs" / f"option_{name}")
        summary = _run(cfg)
        rows.append(
            _row(
                f"student: LoQI ickd+mse+triplet, option {name}",
                "option",
                summary["metrics"],
                ns,
                losses=f"ickd+mse+triplet ({name})",
                queries=degrader.label,
                short=f"LoQI full, {name}",
                train_seconds=summary["train_seconds"],
                steps=summary["steps"],
                variant=f"option:{name}",
                checkpoint=summary["checkpoint"],
            )
        )
    # 5. outputs
    title = (
        f"LoQI on {val.name} ({len(val.queries)} queries, {len(val.database)} database images; "
        f"{val.ground_truth.describe()}), degradation {degrader.label}, input {size}"
    )
    atomic_write_text(out / "table.md", markdown_table(rows, ns, title=title))
    results = [
        EvalResult(
            name=val.name,
            model=r["name"],
            degradation=r["queries"],
            recalls={n: r[f"R@{n}"] for n in ns},
            n_queries=len(val.queries),
            extra={k: v for k, v in r.items() if k not in ("name",) and not k.startswith("R@")},
        )
        for r in rows
    ]
    save_results_json(results, out / "results.json")
    short = [
        EvalResult(name="", model=r["short"], degradation="", recalls={n: r[f"R@{n}"] for n in ns})
        for r in rows
        if r["queries"] == degrader.label
    ]
    plot_recall_curves(
        short, out / "recall.png", title=f"LoQI ablation, Nordland val, {degrader.label} queries"
    )
    students = [r for r in rows if r["kind"] == "student"]
    if install and students:
        best = max(students, key=lambda r: (r["R@1"], r[f"R@{ns[1]}"] if len(ns) > 1 else 0))
        meta = {
            "study": str(out),
            "selected_by": "validation R@1 (student database)",
            "variant": best["variant"],
            "dataset": val.name,
            "split": recipe.data.split.__dict__,
            "input_size": size,
            "teacher_training": "ImageNet MobileNetV2 fine-tuned with the triplet loss on high-quality "
            "images of the same split (no VPR-trained weights available)",
        }
        export_deployed(best["checkpoint"], install, meta=meta, sidecar=True)
        log.info("installed %s (%s) at %s", best["name"], best["checkpoint"], install)
    return rows


def _authors_terms(s_z, t_z, s_desc, t_desc, tuples: int):
    """The three terms as the LoQI authors' trainer weights and computes them (for :func:`term_balance`):
    ICKD over the whole batch (channels L2-normalised over space, correlation rows L2-normalised, Frobenius
    norm of the difference, not squared) / 1000; ``nn.MSELoss`` (per-element mean) x 100; the triplet with
    Euclidean distances and margin sqrt(0.1), mean over the negatives, summed over the tuples, / 10."""
    def corr(f: torch.Tensor) -> torch.Tensor:
        f = F.normalize(f.flatten(2).float(), dim=2)
        return F.normalize(torch.bmm(f, f.transpose(1, 2)), dim=2)

    ickd = torch.linalg.norm(corr(s_z) - corr(t_z)) / 1000
    mse = (s_desc - t_desc).pow(2).mean() * 100
    d = s_desc.view(tuples, -1, s_desc.shape[-1])
    d_pos = (d[:, 0] - d[:, 1]).norm(dim=-1, keepdim=True)
    d_neg = (d[:, :1] - d[:, 2:]).norm(dim=-1)
    trip = F.relu(0.1**0.5 + d_pos - d_neg).mean(dim=1).sum() / 10
    return float(ickd), float(mse), float(trip)


def term_balance(recipe: TrainConfig, teacher: str, *, batches: int = 10) -> dict[str, Any]:
    """How ``alpha`` and ``beta`` were chosen. On the first ``batches`` training batches of ``recipe`` (its
    tuples, mining and degradation) with the teacher-initialised student: the mean unweighted terms in this
    code's forms, the same batches' terms as the authors' trainer weights and computes them
    (:func:`_authors_terms`), and the ``alpha`` / ``beta`` that give this code's weighted terms the
    authors' ratio ICKD : MSE : triplet."""
    cfg = load_config_copy(recipe)
    cfg.model.teacher, cfg.model.init = teacher, "teacher"
    cfg.loss.ickd = cfg.loss.mse = cfg.loss.triplet = True
    cfg.loss.ickd_weight = cfg.loss.alpha = cfg.loss.beta = 1.0
    student, teacher_model = build_branches(cfg.model)
    train_places, _ = build_places(cfg.data).split_by_place(cfg.data.split)
    ds = TupleDataset(
        train_places,
        preprocess=student.preprocess,
        degrader=Degrader(cfg.degradation.specs),
        negatives=cfg.data.negatives,
        targets=cfg.degradation.targets,
        seed=cfg.run.seed,
        pool=cfg.data.mining_pool,
    )
    if cfg.data.mining == "hard":
        q = describe(student, [ds.cache.get(r) for r in train_places.queries])
        db = describe(student, [ds.cache.get(r) for r in train_places.database])
        ds.set_cache(q, db)
    objective = LoQI(student, teacher_model, cfg.loss).eval()
    bs = cfg.schedule.batch_size
    ours = {"ickd": 0.0, "mse": 0.0, "triplet": 0.0}
    authors = dict(ours)
    with torch.no_grad():
        for b in range(batches):
            items = [ds[i] for i in range(b * bs, (b + 1) * bs)]
            hq = torch.stack([it["hq"] for it in items])
            lq = torch.stack([it["lq"] for it in items])
            out = objective(hq, lq)
            s_maps, s_desc = forward_outputs(student, lq.flatten(0, 1), maps=True, desc=True)
            t_maps, t_desc = forward_outputs(teacher_model, hq.flatten(0, 1), maps=True, desc=True)
            theirs = _authors_terms(s_maps[-1], t_maps[-1], s_desc, t_desc, bs)
            for i, k in enumerate(ours):
                ours[k] += float(out[k]) / batches
                authors[k] += theirs[i] / batches
    alpha = authors["mse"] / authors["ickd"] * ours["ickd"] / ours["mse"]
    beta = authors["triplet"] / authors["ickd"] * ours["ickd"] / ours["triplet"]
    return {"terms": ours, "authors_weighted_terms": authors, "alpha": alpha, "beta": beta}


def load_config_copy(cfg: TrainConfig) -> TrainConfig:
    """A deep copy of a config (variants change a few keys)."""
    return config_from_dict(cfg.to_dict())


if __name__ == "__main__":
    sys.exit("moved: use `vpr-ros study loqi-ablation ...`")
