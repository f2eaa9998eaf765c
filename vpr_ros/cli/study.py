"""The ``vpr-ros study`` subcommands: the report generators of :mod:`vpr_ros.studies` (LoQI ablation,
StructVPR comparison), each one call of the study's ``run_study`` with explicit arguments."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vpr_ros.core.errors import ConfigError


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def cmd_loqi_ablation(args: argparse.Namespace) -> int:
    # torch and the training room load only when a study runs
    from vpr_ros.studies.loqi_ablation import VARIANTS, run_study, term_balance
    from vpr_ros.training.methods.loqi import load_config

    recipe = load_config(args.recipe, [*args.overrides, *args.set_student])
    if args.balance:
        if not args.teacher:
            raise ConfigError("--balance needs --teacher CKPT")
        print(json.dumps(term_balance(recipe, args.teacher), indent=2))
        return 0
    teacher_recipe = None if args.teacher else load_config(args.teacher_recipe, args.overrides)
    rows = run_study(recipe, args.out, teacher_recipe=teacher_recipe, teacher=args.teacher,
                     variants=_names(args.variants) if args.variants else list(VARIANTS),
                     options=_names(args.options), install=args.install)
    print((Path(args.out) / "table.md").read_text())
    return 0 if rows else 1


def cmd_structvpr_comparison(args: argparse.Namespace) -> int:
    # torch and the training room load only when a study runs
    from vpr_ros.studies.structvpr_comparison import DEFAULT_VARIANTS, run_study

    run_study(args.config, args.out, args.overrides, args.variants or DEFAULT_VARIANTS)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``study`` and its subcommands to ``vpr-ros``."""
    study = sub.add_parser("study", help="regenerate a study's table and plots (LoQI ablation, StructVPR)",
                           description="Report generators: each trains and evaluates its variants, writes "
                                       "table.md, results.json and plots to --out, and reuses finished runs.")
    studies = study.add_subparsers(dest="study", required=True, metavar="STUDY")

    p = studies.add_parser("loqi-ablation", help="LoQI: recall of every loss combination (docs/training.md)",
                           description="Teacher, baselines and one student per LoQI loss combination on one "
                                       "place split; table.md, results.json and recall.png in --out.")
    p.add_argument("--out", default="results/loqi", help="output folder (table.md, results.json, recall.png)")
    p.add_argument("--recipe", default="training/loqi_nordland_jpeg10.yaml", help="student recipe")
    p.add_argument("--teacher-recipe", default="training/teacher_nordland.yaml", help="teacher recipe")
    p.add_argument("--teacher", help="use this teacher checkpoint instead of training one")
    p.add_argument("--variants", default=None,
                   help="comma list of loss combinations (default: all seven, triplet ... ickd+mse+triplet)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of both recipes (e.g. data.root=...)")
    p.add_argument("--set-student", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the student recipe only")
    p.add_argument("--options", default="",
                   help="comma list of earlier forms of a term, each trained with the full loss")
    p.add_argument("--install", help="export the best student here (e.g. vpr_ros/weights/..._loqi.pt)")
    p.add_argument("--balance", action="store_true",
                   help="only print the start-of-training loss terms and the alpha / beta that balance them "
                        "(needs --teacher)")
    p.set_defaults(func=cmd_loqi_ablation)

    p = studies.add_parser("structvpr-comparison", help="StructVPR: table, group shares, SLME picture "
                                                        "(docs/structvpr.md)",
                           description="StructVPR Stage I/II variants on real data: the comparison table, "
                                       "the group shares and the SLME picture in --out.")
    p.add_argument("--out", default="results/structvpr", help="output folder (table.md, results.json, plots)")
    p.add_argument("--config", default="training/structvpr_kitti_cpu.yaml", help="StructVPR recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (e.g. stage2.steps=100)")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                   help="Stage II variants (default: all; e.g. none gp-d-phi kd-all)")
    p.set_defaults(func=cmd_structvpr_comparison)
