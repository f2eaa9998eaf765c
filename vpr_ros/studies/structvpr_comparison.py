"""The StructVPR comparison on real data: regenerate the table, the group shares and the SLME picture.

    vpr-ros study structvpr-comparison --out results/structvpr [--config RECIPE] [--set k=v]

Rows (all RGB rows are MobileNetV2 students evaluated alone, as deployed), after the paper's ablation
(Sec. 4.4, Tables 5 and 6):

* ``imagenet`` -- the untrained ImageNet student (reference);
* ``rgb-branch`` -- Stage I rgb-branch (triplet);
* ``seg-branch`` -- Stage I seg-branch on SLME maps (needs segmentation at test time: reference only);
* ``none`` -- Stage II without distillation (Table 5 "None"; control: same initialisation, tuples and
  steps as the distilled students);
* ``gp-d-phi`` -- StructVPR: partition GP-D, weights phi (Eq. 4; Table 5 "Ours", Table 6 GP-D(phi));
* ``gp-s`` -- selective KD on S1 (x <= N_t; Table 5 S1, Table 6 GP-S(1-0));
* ``gp-r`` -- selective KD on R1 (y <= N_t; Table 5 R1);
* ``gp-d-8410`` -- constant weights 8-4-1-0 on D1-D4 (Table 6 GP-D(8-4-1-0));
* ``gp-s-phi-prime`` -- GP-S with phi' (Eq. 7; Table 6 GP-S(phi'));
* ``kd-all`` -- non-selective distillation, every pair weight 1 (Table 5 "All");
* ``gp-d-phi+<option>`` -- StructVPR with one named deviation from the paper (:data:`OPTIONS`): the
  measured effect of each option.

Queries are evaluated as captured and as received through each ``eval_degradations`` link (JPEG q10),
against a high-quality database. Training times are the stages' forward/backward/update seconds (the
Stage II rows add the Stage I seg-branch, rgb-branch and partition they depend on in ``total``). Runs
live in ``OUT/runs``; finished stages are reused, so the study can be re-run after a stop.
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

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from vpr_ros.core.errors import ConfigError
from vpr_ros.core.fileio import atomic_write_text
from vpr_ros.core.models import create_model
from vpr_ros.training.methods.structvpr.partition import GROUPS, group_shares
from vpr_ros.training.methods.structvpr.pipeline import (
    PAPER_SHARES,
    Stage2Config,
    StructVPR,
    load_config,
    load_trained,
)
from vpr_ros.training.methods.structvpr.segmentation import CITYSCAPES_PALETTE, colorize, read_label_map
from vpr_ros.training.methods.structvpr.weighted_kd import WeightingConfig

log = logging.getLogger("vpr_ros.studies.structvpr_comparison")

#: Stage II variants: name -> (kd weight multiplier, weighting)
VARIANTS: dict[str, tuple[float, WeightingConfig | None]] = {
    "none": (0.0, None),
    "gp-d-phi": (1.0, WeightingConfig("gp-d", "phi")),
    "gp-s": (1.0, WeightingConfig("gp-s", "ones")),
    "gp-r": (1.0, WeightingConfig("gp-r", "ones")),
    "gp-d-8410": (1.0, WeightingConfig("gp-d", "constant", constant=[8.0, 4.0, 1.0, 0.0])),
    "gp-s-phi-prime": (1.0, WeightingConfig("gp-s", "phi-prime")),
    "kd-all": (1.0, WeightingConfig("all", "ones")),
}
#: The named deviations (not the paper's form), each measured as ``gp-d-phi+<name>``: stage2 / weighting
#: settings that replace the recipe's.
OPTIONS: dict[str, dict[str, str]] = {
    "rgb-init": {"init": "rgb-branch"},
    "ridge-T": {"t_init": "ridge"},
    "hardest-positive": {"sampling": "hardest-positive"},
    "wrong-only": {"rank": "wrong-only"},
}
for _opt in OPTIONS:
    VARIANTS[f"gp-d-phi+{_opt}"] = VARIANTS["gp-d-phi"]
DEFAULT_VARIANTS = tuple(VARIANTS)

#: The paper's numbers for the same rows (MSLS val R@1 / R@5 / R@10; Tables 5 and 6), for context.
PAPER_MSLS_VAL: dict[str, tuple[str, tuple[float, float, float]]] = {
    "none": ("Table 5 None", (75.8, 85.3, 87.3)),
    "gp-d-phi": ("Table 5 Ours = Table 6 GP-D(phi)", (83.0, 91.0, 92.6)),
    "gp-s": ("Table 5 S1 = Table 6 GP-S(1-0)", (81.6, 88.9, 91.2)),
    "gp-r": ("Table 5 R1", (79.3, 87.6, 88.9)),
    "gp-d-8410": ("Table 6 GP-D(8-4-1-0)", (82.2, 88.9, 91.5)),
    "gp-s-phi-prime": ("Table 6 GP-S(phi')", (79.7, 89.5, 92.0)),
    "kd-all": ("Table 5 All", (78.4, 87.4, 90.1)),
}

#: SLME group colours for pictures (vegetation, dynamic, sky, ground, buildings, objects, ...).
GROUP_COLORS = np.array(
    [
        (107, 142, 35),
        (220, 20, 60),
        (70, 130, 180),
        (128, 64, 128),
        (70, 70, 70),
        (250, 170, 30),
        (0, 0, 142),
        (152, 251, 152),
    ],
    dtype=np.uint8,
)


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def slme_picture(sv: StructVPR, out: Path, frames: int = 4) -> Path:
    """Frames of the training sequence: image | segmenter classes | SLME groups (colour = group,
    brightness = weight)."""

    matplotlib.use("Agg")

    recs = sv.train_places.queries
    picks = [recs[int(i)] for i in np.linspace(0, len(recs) - 1, frames).round()]
    enc = sv.bank.encoder if sv.bank is not None else sv.segment_training().encoder
    wmax = float(enc.weights.max())
    fig, axes = plt.subplots(frames, 3, figsize=(15, 1.75 * frames + 0.8), squeeze=False)
    for row, rec in zip(axes, picks, strict=True):
        image = rec.load()
        labels = read_label_map(sv.cache.path(rec.path, sv.segmenter.id))
        groups = enc.group_map(labels, labels.shape)
        pic = np.zeros((*groups.shape, 3), np.float32)
        for g in range(enc.channels):
            shade = 0.35 + 0.65 * enc.weights[g] / wmax
            pic[groups == g] = GROUP_COLORS[g % len(GROUP_COLORS)] * shade
        for ax, img, title in zip(
            row,
            (image, colorize(labels), pic.astype(np.uint8)),
            (f"{rec.sequence}/{rec.name}", sv.segmenter.id, f"SLME, C={enc.channels} (brighter = heavier)"),
            strict=True,
        ):
            ax.imshow(img)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    handles = [
        Patch(color=GROUP_COLORS[g % len(GROUP_COLORS)] / 255, label=f"{n} ({enc.weights[g]:g})")
        for g, n in enumerate(enc.names)
    ]
    used = sorted(
        set(
            np.concatenate(
                [np.unique(read_label_map(sv.cache.path(r.path, sv.segmenter.id))) for r in picks]
            ).tolist()
        )
    )
    handles += [
        Patch(color=CITYSCAPES_PALETTE[c] / 255, label=sv.segmenter.classes[c])
        for c in used
        if c < len(CITYSCAPES_PALETTE)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(8, len(handles)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _with_option(
    stage: Stage2Config, weighting: WeightingConfig | None, option: str
) -> tuple[Stage2Config, WeightingConfig]:
    """The recipe's Stage II and the variant's weighting with the named option (``""``: none) applied."""
    weighting = weighting or stage.weighting
    if not option:
        return stage, weighting
    changes = OPTIONS[option]
    w_keys = {f.name for f in dataclasses.fields(WeightingConfig)}
    weighting = dataclasses.replace(weighting, **{k: v for k, v in changes.items() if k in w_keys})
    stage = dataclasses.replace(stage, **{k: v for k, v in changes.items() if k not in w_keys})
    return stage, weighting


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def run_study(
    config: str | Path,
    out: str | Path,
    overrides: Sequence[str] = (),
    variants: Sequence[str] = DEFAULT_VARIANTS,
) -> dict[str, Any]:
    """Train and evaluate the ``variants`` (keys of :data:`VARIANTS`) of recipe ``config`` with
    ``key=value`` ``overrides``; write ``table.md`` and ``results.json`` in ``out`` and return the results."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    out = Path(out)
    cfg = load_config(config, [*overrides, f"dir={out / 'runs'}"])
    sv = StructVPR(cfg)
    t0 = time.perf_counter()
    sv.segment_training()
    sv.segment([r.path for r in sv.test_places.database] + [r.path for r in sv.test_places.queries])
    seg_seconds = time.perf_counter() - t0
    seg1, rgb1 = sv.stage1_seg(), sv.stage1_rgb()
    t0 = time.perf_counter()
    pairs = sv.partition()
    part_seconds = time.perf_counter() - t0
    shares = group_shares(pairs, cfg.stage2.weighting.n_t)
    drawn: dict[str, dict[str, int]] = {}
    stage1 = _summary(seg1)["train_seconds"] + _summary(rgb1)["train_seconds"]
    rows: list[dict[str, Any]] = []

    def row(
        name: str,
        model,
        *,
        seg: bool = False,
        train_s: float | None = None,
        total_s: float | None = None,
        note: str = "",
    ) -> None:
        rec = sv.evaluate(model, seg=seg)
        rows.append(
            {"name": name, "recall": rec, "train_seconds": train_s, "total_seconds": total_s, "note": note}
        )
        log.info("%s: %s", name, rec)

    imagenet = create_model("structvpr_mobilenetv2", pretrained=True)
    imagenet.preprocess = sv.new_rgb().preprocess
    row("imagenet", imagenet.eval(), note="no training")
    row(
        "rgb-branch",
        load_trained(rgb1),
        train_s=_summary(rgb1)["train_seconds"],
        total_s=_summary(rgb1)["train_seconds"],
        note="Stage I, triplet",
    )
    row(
        "seg-branch",
        load_trained(seg1),
        seg=True,
        train_s=_summary(seg1)["train_seconds"],
        total_s=_summary(seg1)["train_seconds"],
        note="Stage I on SLME; segments every test image",
    )
    for name in variants:
        lam, weighting = VARIANTS[name]
        stage, weighting = _with_option(cfg.stage2, weighting, name.partition("+")[2])
        run = sv.stage2(
            f"stage2_{name}", weighting=weighting, kd_weight=lam * cfg.stage2.kd_weight, stage=stage
        )
        s = _summary(run)
        extra = stage1 + part_seconds
        note = f"distilled pairs {100 * s.get('distilled_share', 0):.0f}%" if lam > 0 else "no distillation"
        hist = s.get("group_histogram", {})
        drawn[name] = {g: sum(h.get(g, 0) for h in hist.values()) for g in (*GROUPS, "none")}
        row(
            name, load_trained(run), train_s=s["train_seconds"], total_s=s["train_seconds"] + extra, note=note
        )
    deployed = (
        sv.export("stage2_gp-d-phi", out / "structvpr_mobilenetv2_kitti.pt")
        if "gp-d-phi" in variants
        else None
    )
    picture = slme_picture(sv, out / "slme.png")

    labels = list(rows[0]["recall"])
    head = (
        "| model | "
        + " | ".join(f"R@1 {lb} | R@5 {lb}" for lb in labels)
        + " | train s | total s | paper, MSLS val R@1 / R@5 / R@10 | note |"
    )
    lines = [head, "|" + "---|" * (2 * len(labels) + 5)]
    for r in rows:
        cells = " | ".join(f"{_fmt(r['recall'][lb][1])} | {_fmt(r['recall'][lb][5])}" for lb in labels)
        ts = "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        tt = "-" if r["total_seconds"] is None else f"{r['total_seconds']:.0f}"
        paper = PAPER_MSLS_VAL.get(r["name"])
        pc = f"{' / '.join(f'{v:.1f}' for v in paper[1])} ({paper[0]})" if paper else "-"
        lines.append(f"| {r['name']} | {cells} | {ts} | {tt} | {pc} | {r['note']} |")
    share_line = (
        "| group | "
        + " | ".join(GROUPS)
        + " |\n|---|---|---|---|---|\n"
        + "| this run, all (q, p) pairs | "
        + " | ".join(f"{100 * shares[g]:.1f}%" for g in GROUPS)
        + " |\n"
        + "".join(
            f"| this run, tuples drawn in Stage II ({name}) | "
            + " | ".join(str(h[g]) for g in GROUPS)
            + " |\n"
            for name, h in drawn.items()
            if name == "gp-d-phi"
        )
        + "| paper (MSLS) | "
        + " | ".join(f"{100 * PAPER_SHARES[g]:.1f}%" for g in GROUPS)
        + " |"
    )
    p = sv.test_places
    text = "\n".join(
        [
            f"# StructVPR on {sv.train_places.name} -> {p.name}",
            "",
            f"Train: {sv.train_places.summary()}",
            f"Test: {p.summary()}",
            f"Segmenter: {sv.segmenter.id} ({len(sv.bank.groups)} label maps, {seg_seconds:.0f} s this run; "
            f"computed once, cached in {cfg.segmentation.cache_dir}); SLME groups {list(cfg.slme.groups)} "
            f"weights "
            f"{cfg.slme.weights} at {cfg.slme.size or cfg.input_size}",
            "",
            *lines,
            "",
            f"Group partition of {len(pairs)} training pairs (N_t = {cfg.stage2.weighting.n_t}, ranks "
            f"{cfg.stage2.weighting.rank}; partition {part_seconds:.0f} s):",
            "",
            share_line,
            "",
            f"SLME picture: {picture}",
            f"Deployed StructVPR student: {deployed}",
            "",
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "table.md", text)
    result = {
        "rows": rows,
        "shares": shares,
        "drawn_groups": drawn,
        "paper_shares": PAPER_SHARES,
        "pairs": len(pairs),
        "segmenter": sv.segmenter.id,
        "segmentation_seconds": seg_seconds,
        "partition_seconds": part_seconds,
        "picture": str(picture),
        "deployed": str(deployed) if deployed else None,
        "config": cfg.to_dict(),
    }
    atomic_write_text(out / "results.json", json.dumps(result, indent=2, default=str) + "\n")
    print(text)
    return result


if __name__ == "__main__":
    sys.exit("moved: use `vpr-ros study structvpr-comparison ...`")
