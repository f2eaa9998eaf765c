"""Cross-domain (leave-one-dataset-out) part of the accuracy study, the model cards and the default's gate.

Every packaged checkpoint (``vpr_ros/weights/*.pt``) and the ImageNet-initialised student, at each
checkpoint's input size and at the deployment size (240x320), on every study set (:func:`.study.load_sets`)
through the standard links (:data:`CROSS_LINKS`): R@1 / R@5 / R@10 with the high-quality map. Each set is
*in domain*, *out of domain* or *training data* for a checkpoint by its model card (:mod:`.models.card`:
the families and sets it trained on, read from the checkpoint). The results go to ``out/cross_domain.json``,
into each checkpoint's card (``meta["card"]["cross_domain"]``, so ``vpr-ros models`` shows them), and to a
generated block of the results page.

The gate of a checkpoint against its teacher, the ImageNet-initialised student at the
checkpoint's input size, on each set not trained on: clean R@1 >= teacher - 1 point, and on every link
``R@1_student - R@1_teacher >= 0.5 * (R@1_teacher,clean - R@1_teacher,link)`` (it recovers at least half
of what the link costs the teacher). Every verdict is reported, pass or fail.

Descriptors are cached with the study's caches (``out/cache``), keyed by the set, link, weights (not the
checkpoint's bytes: writing a card does not invalidate them), input size and inference backend.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from vpr_ros.core.backends import default_backend, find_int8_export
from vpr_ros.core.extract import DescriptorExtractor
from vpr_ros.core.fileio import atomic_write_text
from vpr_ros.core.models import create_model, load_model
from vpr_ros.core.models.card import (
    CARD_LINKS,
    ModelCard,
    packaged_checkpoints,
    read_card,
    weights_digest,
    write_card,
)
from vpr_ros.core.models.resolve import DEFAULT_WEIGHTS
from vpr_ros.core.transmission import STANDARD_LINKS, TransmissionConfig
from vpr_ros.eval.metrics import RECALL_NS, json_default, recall_at_n
from vpr_ros.studies.accuracy import (
    _Cache,
    _hash,
    _send,
    _top_k,
    load_sets,
    query_positions,
    recall_applies,
    set_identity,
    stream,
)

log = logging.getLogger(__name__)

#: The standard links of the cross-domain table (clean, JPEG q10, 1/4 resolution, H.264 / H.265 QP 40).
CROSS_LINKS = STANDARD_LINKS
#: The deployment input size (H, W): what the nodes run the default student at.
DEPLOY_SIZE = (240, 320)
GATE_CLEAN_TOLERANCE = 0.01  # clean R@1 may be at most 1 point below the teacher's
GATE_RECOVERY = 0.5  # share of the teacher's loss on a link the student must recover
BEGIN = "<!-- BEGIN GENERATED: cross-domain (scripts/accuracy_study.py); edits inside are overwritten -->"
END = "<!-- END GENERATED: cross-domain -->"
DOMAIN_TEXT = {"in": "in domain", "out": "out of domain", "train": "training data (not a test)"}


@dataclass
class CrossConfig:
    """What the cross-domain part runs. ``checkpoints`` None: every packaged checkpoint; ``backend``:
    inference backend of the evaluation (``auto``: ONNX Runtime on CPU, torch on CUDA; the descriptors
    agree to ~1e-5 and ONNX Runtime is several times faster on CPU)."""

    links: tuple[str, ...] = CROSS_LINKS
    deploy_size: tuple[int, int] = DEPLOY_SIZE
    checkpoints: list[Path] | None = None
    backend: str = "auto"
    precision: str = "fp32"  # of the checkpoints (int8: their calibrated int8 export; ImageNet stays fp32)
    default: Path | None = None  # the packaged default (marked in tables); None: resolve's default
    write_cards: bool = True
    page: Path | None = None  # results page whose cross-domain block is written (None: none)


@dataclass
class Column:
    """One model of the table: a checkpoint (``card``) or the ImageNet-initialised student at ``size``."""

    key: str
    label: str
    weights: Path | None
    size: tuple[int, int] | None
    digest: str = "imagenet"
    card: ModelCard | None = None

    def identity(self, backend: str, precision: str = "fp32") -> str:
        tail = "" if precision == "fp32" else f":{precision}"
        return f"cross:{self.key}:{self.digest}:{self.size}:{backend}{tail}"

    def load(self) -> Any:

        if self.weights is None:
            net = create_model("structvpr_mobilenetv2", pretrained=True).eval()
            net.preprocess = dataclasses.replace(net.preprocess, input_size=self.size)
            return net
        return load_model(self.weights)


def imagenet_key(size: tuple[int, int] | None) -> str:
    return "imagenet@native" if size is None else f"imagenet@{size[0]}x{size[1]}"


def build_columns(cx: CrossConfig) -> list[Column]:
    """The checkpoints (with their cards) and the ImageNet student at each of their sizes and the
    deployment size."""
    cols: list[Column] = []
    for path in cx.checkpoints if cx.checkpoints is not None else packaged_checkpoints():
        card = read_card(path)
        cols.append(Column(card.key, card.title, Path(path), card.input_size, weights_digest(path), card))
    sizes = list(dict.fromkeys([c.size for c in cols] + [tuple(cx.deploy_size)]))
    for size in sizes:
        cols.append(Column(imagenet_key(size), "ImageNet-initialised student (no VPR training)", None, size))
    keys = [c.key for c in cols]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise ValueError(f"two checkpoints share the card key(s) {sorted(dup)}; give each a distinct key")
    return cols


def resolve_backend(backend: str) -> str:

    return default_backend() if backend == "auto" else backend


# --------------------------------------------------------------------------- evaluation


def evaluate(study_cfg: Any, cx: CrossConfig, *, sets: list | None = None) -> dict[str, Any]:
    """R@N of every column on every set and link (cached); see the module docstring. Returns the raw
    results: ``results[column][set][link]`` = ``{"R@1", "R@5", "R@10", "queries"}`` (similarity sets:
    ``{"cos"}``), ``links[set][link]`` = bytes per frame, and the columns and sets."""

    t0 = time.perf_counter()
    backend = resolve_backend(cx.backend)
    cols = build_columns(cx)
    sets = load_sets(study_cfg) if sets is None else sets
    cache = _Cache(Path(study_cfg.out) / "cache")
    results: dict[str, dict[str, dict[str, Any]]] = {c.key: {} for c in cols}
    link_bytes: dict[str, dict[str, float]] = {}
    extractors: dict[str, Any] = {}

    def prec(c: Column) -> str:
        return cx.precision if c.card is not None else "fp32"

    int8_files: dict[str, str] = {}

    def ident(c: Column) -> str:
        if prec(c) != "int8":
            return c.identity(backend, prec(c))
        if c.key not in int8_files:  # the int8 export in use: another calibration is another model
            path = find_int8_export(c.load())
            int8_files[c.key] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        return f"{c.identity(backend, 'int8')}:{int8_files[c.key]}"

    def fname(c: Column) -> str:  # cache file: beside the main study's ("loqi", ...); fp32 and int8 apart
        return f"cross_{c.key}" if prec(c) == "fp32" else f"cross_{c.key}.{prec(c)}"

    def describe(c: Column, images: list, desc: str) -> np.ndarray:


        if c.key not in extractors:
            extractors[c.key] = DescriptorExtractor(c.load(), device=study_cfg.device,
                                                    batch_size=study_cfg.batch_size, backend=backend,
                                                    precision=prec(c))
        ext = extractors[c.key]
        out = np.empty((len(images), ext.dim), dtype=np.float32)
        step = study_cfg.batch_size * 4
        for i in tqdm(range(0, len(images), step), desc=desc, unit="batch", disable=not study_cfg.progress,
                      leave=False):
            out[i : i + step] = ext(images[i : i + step])
        return out

    for s in sets:
        db: dict[str, np.ndarray] = {}
        for c in cols:
            key = _hash(set_identity(s), "db", ident(c))
            arr = cache.get_array(s.name, "_map", fname(c), key)
            if arr is None:
                arr = describe(c, [r.load() for r in s.database], f"{s.name} map {c.key}")
                cache.put_array(s.name, "_map", fname(c), key, arr)
                cache.described += 1
            db[c.key] = arr
        hq_stream = None
        link_bytes[s.name] = {}
        for spec in cx.links:
            label = TransmissionConfig.parse(spec).label
            link_key = _hash(set_identity(s), spec)  # the main study's link key: its byte counts are shared
            stats = cache.get_json(s.name, label, "link", link_key)
            descs = {}
            for c in cols:
                arr = cache.get_array(s.name, label, fname(c), _hash(link_key, ident(c)))
                if arr is not None:
                    descs[c.key] = arr
            if stats is None or len(descs) < len(cols):
                if hq_stream is None:
                    hq_stream = [r.load() for r in stream(s)]
                link = _send(hq_stream, spec, desc=f"{s.name} {label}", progress=study_cfg.progress)
                stats = link.stats
                cache.put_json(s.name, label, "link", link_key, stats)
                for c in cols:
                    if c.key not in descs:
                        descs[c.key] = describe(c, link.frames, f"{s.name} {label} {c.key}")
                        key = _hash(link_key, ident(c))
                        cache.put_array(s.name, label, fname(c), key, descs[c.key])
                        cache.described += 1
            link_bytes[s.name][label] = float(stats["bytes_per_frame"])
            for c in cols:
                q = descs[c.key][query_positions(s)]
                if not recall_applies(s):
                    results[c.key].setdefault(s.name, {})[label] = {"cos": float(q[0] @ db[c.key][0])}
                    continue
                _, ids = _top_k(q, db[c.key], max(RECALL_NS))
                rec = recall_at_n(ids, s.positives())
                cell: dict[str, Any] = {f"R@{n}": float(rec[n]) for n in RECALL_NS}
                cell["queries"] = int(rec.n_queries)
                cell["hits_at_1"] = int(np.sum(rec.first_hit == 0))
                has = np.array([len(p) > 0 for p in s.positives()])
                cell["hit1"] = (rec.first_hit[has] == 0).astype(int).tolist()  # per query, for the bootstrap
                results[c.key].setdefault(s.name, {})[label] = cell
        log.info("cross-domain %s done", s.name)
    return {
        "backend": backend,
        "precision": cx.precision,
        "links": [TransmissionConfig.parse(sp).label for sp in cx.links],
        "columns": [
            {"key": c.key, "label": c.label, "weights": None if c.weights is None else c.weights.name,
             "input_size": c.size, "digest": c.digest[:12],
             "card": None if c.card is None else {
                 "title": c.card.title, "method": c.card.method, "train_data": c.card.train_data,
                 "train_domains": c.card.train_domains, "train_sets": c.card.train_sets}}
            for c in cols
        ],
        "sets": [{"key": s.name, "title": s.title, "queries": len(s.queries), "database": len(s.database),
                  "recall": recall_applies(s)} for s in sets],
        "results": results,
        "link_bytes": link_bytes,
        "described": cache.described,
        "seconds": time.perf_counter() - t0,
        "_cols": cols,
    }


# --------------------------------------------------------------------------- domains, gate, cards


def domains_of(card: ModelCard, set_keys: list[str]) -> dict[str, str]:
    return {s: card.domain(s) for s in set_keys}


def _margin_interval(s_link: list[int], t_link: list[int], t_clean: list[int], recovery: float,
                     offset: float, *, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """90 % interval of ``gain - needed`` over paired bootstrap resamples of the queries (per-query hits at
    rank 1 of student and teacher on the link and of the teacher clean); ``offset`` is added (the clean
    row's tolerance)."""
    sl, tl, tc = (np.asarray(v, dtype=float) for v in (s_link, t_link, t_clean))
    idx = np.random.default_rng(seed).integers(0, len(sl), size=(n, len(sl)))
    margin = (sl[idx].mean(1) - tl[idx].mean(1)) - recovery * (tc[idx].mean(1) - tl[idx].mean(1)) + offset
    lo, hi = np.percentile(margin, [5, 95])
    return float(lo), float(hi)


def gate(student: dict[str, dict[str, Any]], teacher: dict[str, dict[str, Any]], links: list[str],
         *, tolerance: float = GATE_CLEAN_TOLERANCE, recovery: float = GATE_RECOVERY) -> list[dict[str, Any]]:
    """The gate's rows on one set: ``student`` / ``teacher`` map link label -> {"R@1": ...} (and, when
    there, ``hit1``: per-query hits at rank 1).

    Clean row: pass when R@1_s,clean >= R@1_t,clean - ``tolerance``. Link rows: ``needed`` =
    ``recovery`` x (R@1_t,clean - R@1_t,link), ``gain`` = R@1_s,link - R@1_t,link, pass when gain >= needed
    (to 1e-9); ``beats`` says whether the student is strictly better than the teacher on the link.
    ``margin_ci90``: the 90 % paired-bootstrap interval of gain - needed (None without per-query hits): a
    verdict whose interval contains 0 is within the noise of the set's queries."""
    t_clean, s_clean = teacher["none"]["R@1"], student["none"]["R@1"]
    have = all("hit1" in d.get(lb, {}) for d in (student, teacher) for lb in links)
    rows = [{"link": "none", "teacher": t_clean, "student": s_clean, "needed": -tolerance,
             "gain": s_clean - t_clean, "pass": s_clean - t_clean >= -tolerance - 1e-9, "beats": None,
             "margin_ci90": _margin_interval(student["none"]["hit1"], teacher["none"]["hit1"],
                                             teacher["none"]["hit1"], 0.0, tolerance) if have else None}]
    for lb in links:
        if lb == "none":
            continue
        t, s = teacher[lb]["R@1"], student[lb]["R@1"]
        needed = recovery * (t_clean - t)
        ci = _margin_interval(student[lb]["hit1"], teacher[lb]["hit1"], teacher["none"]["hit1"], recovery,
                              0.0) if have else None
        rows.append({"link": lb, "teacher": t, "student": s, "teacher_clean": t_clean, "needed": needed,
                     "gain": s - t, "pass": s - t >= needed - 1e-9, "beats": s > t, "margin_ci90": ci})
    return rows


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    """Per checkpoint: each set's domain, mean R@1 / R@5 per link over the sets of each domain (sets with
    recall only), the same for its ImageNet baseline (same input size), and its gate rows."""
    cols: list[Column] = raw["_cols"]
    links = raw["links"]
    set_keys = [s["key"] for s in raw["sets"] if s["recall"]]
    res = raw["results"]
    out = {}
    for c in cols:
        if c.card is None:
            continue
        base = imagenet_key(c.size)
        dom = domains_of(c.card, [s["key"] for s in raw["sets"]])
        summary: dict[str, Any] = {}
        for d in ("in", "out", "train"):
            ss = [s for s in set_keys if dom[s] == d]
            if not ss:
                continue
            summary[d] = {"sets": ss}
            for who, key in (("", c.key), ("imagenet_", base)):
                for n in (1, 5):
                    summary[d][f"{who}R@{n}"] = {
                        lb: float(np.mean([res[key][s][lb][f"R@{n}"] for s in ss])) for lb in links}
        gates = {s: gate(res[c.key][s], res[base][s], links) for s in set_keys if dom[s] != "train"}
        out[c.key] = {"domains": dom, "summary": summary, "gate": gates, "baseline": base,
                      "gate_out_of_domain_pass": all(r["pass"] for s, rows in gates.items() if dom[s] == "out"
                                                     for r in rows),
                      "beats_baseline_out_of_domain": all(r["beats"] for s, rows in gates.items()
                                                          if dom[s] == "out" for r in rows
                                                          if r["beats"] is not None)}
    return out


def card_numbers(raw: dict[str, Any], summary: dict[str, Any], key: str) -> dict[str, Any]:
    """The ``cross_domain`` entry of a checkpoint's card."""
    res = raw["results"][key]
    s = summary[key]
    return {
        "measured": f"make study (scripts/accuracy_study.py), {time.strftime('%Y-%m-%d')}, backend "
                    f"{raw['backend']}",
        "links": raw["links"],
        "sets": {k: {"domain": s["domains"][k], **{lb: {m: v[m] for m in ("R@1", "R@5") if m in v}
                                                   for lb, v in res[k].items()}}
                 for k in res if "R@1" in next(iter(res[k].values()))},
        "summary": {d: {"sets": v["sets"], "R@1": v["R@1"], "R@5": v["R@5"]}
                    for d, v in s["summary"].items()},
        "gate_out_of_domain": "pass" if s["gate_out_of_domain_pass"] else "fail",
    }


def run_cross_domain(study_cfg: Any, cx: CrossConfig) -> dict[str, Any]:
    """Evaluate, summarise, write ``out/cross_domain.json``, the cards (``cx.write_cards``) and the page
    block (``cx.page``); return the summary."""
    raw = evaluate(study_cfg, cx)
    summ = summarise(raw)
    cols: list[Column] = raw.pop("_cols")
    default = cx.default
    if default is None:

        default = DEFAULT_WEIGHTS
    default_key = next((c.key for c in cols if c.weights is not None and c.weights.resolve() == Path(
        default).resolve()), None)
    written = []
    if cx.write_cards:
        for c in cols:
            if c.card is not None and write_card(c.weights, {"cross_domain": card_numbers(raw, summ, c.key)}):
                written.append(c.weights.name)
    data = {**raw, "models": summ, "default": default_key, "cards_written": written}
    out = Path(study_cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "cross_domain.json",
                      json.dumps(data, default=json_default, allow_nan=False, indent=1) + "\n")
    if cx.page is not None:
        write_block(Path(cx.page), render(data))
    return data


# --------------------------------------------------------------------------- the page block


def _p(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _link_title(label: str) -> str:
    return dict(CARD_LINKS).get(label, label)


def render(data: dict[str, Any]) -> str:
    """The cross-domain block of the results page (Markdown, between :data:`BEGIN` and :data:`END`)."""
    links = data["links"]
    cols = data["columns"]
    ckpts = [c for c in cols if c["card"] is not None]
    res, models = data["results"], data["models"]
    sets = data["sets"]
    heads = " | ".join(_link_title(lb) for lb in links)
    L = [BEGIN, "", "## Cross-domain: in and out of each model's training domain", ""]
    L += [f"Generated by `make study` ({len(cols)} models x {len(sets)} sets x {len(links)} links, backend "
          f"{data['backend']}, {data['described']} descriptor sets computed this run, "
          f"{data['seconds'] / 60:.1f} min; raw numbers in `cross_domain.json` beside the study's results). "
          "Training data, input size and domains are read from each checkpoint's model card "
          "(`meta[\"card\"]`); the numbers below are written back into the cards, which `vpr-ros models` "
          "prints. R@1 in %; a set is *in domain* when the checkpoint trained on other images of its "
          "family, *out of domain* when on none, *training data* when on its very images.", ""]
    L += ["### Model cards", "", "| model | file | input | trained on | in domain | out of domain | "
          "training data |", "|---|---|---|---|---|---|---|"]
    for c in ckpts:
        m = models[c["key"]]
        by = {d: [s for s, v in m["domains"].items() if v == d] for d in ("in", "out", "train")}
        size = "native" if c["input_size"] is None else f"{c['input_size'][0]}x{c['input_size'][1]}"
        star = " (default)" if c["key"] == data.get("default") else ""
        L.append(f"| `{c['key']}`{star} | `{c['weights']}` | {size} | {c['card']['train_data']} | "
                 + " | ".join(", ".join(by[d]) or "-" for d in ("in", "out", "train")) + " |")
    L += ["", "### Summary: mean R@1 over the sets of each domain", "",
          "Unweighted mean over the sets with recall (Tokyo is one pair: similarity below). `same-size "
          "ImageNet`: the ImageNet-initialised student at the checkpoint's input size on the same sets.", ""]
    L += [f"| model | domain | sets | {heads} | same-size ImageNet: {heads} |",
          "|---|---|---|" + "---:|" * (2 * len(links))]
    for c in ckpts:
        m = models[c["key"]]
        for d in ("in", "out", "train"):
            v = m["summary"].get(d)
            if not v:
                continue
            a = " | ".join(_p(v["R@1"][lb]) for lb in links)
            b = " | ".join(_p(v["imagenet_R@1"][lb]) for lb in links)
            L.append(f"| `{c['key']}` | {DOMAIN_TEXT[d]} | {', '.join(v['sets'])} | {a} | {b} |")
    L += ["", "### Per set: R@1 / R@5", ""]
    for s in sets:
        k = s["key"]
        L += [f"**{k}** ({s['title']}; {s['queries']} queries, {s['database']} map images)", ""]
        if not s["recall"]:
            L += [f"| model | domain | {heads} |", "|---|---|" + "---:|" * len(links)]
            for c in cols:
                dom = models[c["key"]]["domains"][k] if c["card"] else "-"
                cells = " | ".join(f"{res[c['key']][k][lb]['cos']:.3f}" for lb in links)
                L.append(f"| `{c['key']}` | {DOMAIN_TEXT.get(dom, dom)} | {cells} |")
            L += ["", "(cosine similarity of the received query to its true match)", ""]
            continue
        L += [f"| model | domain | {heads} |", "|---|---|" + "---|" * len(links)]
        for c in cols:
            dom = models[c["key"]]["domains"][k] if c["card"] else "-"
            cells = " | ".join(f"{_p(res[c['key']][k][lb]['R@1'])} / {_p(res[c['key']][k][lb]['R@5'])}"
                               for lb in links)
            L.append(f"| `{c['key']}` | {DOMAIN_TEXT.get(dom, dom)} | {cells} |")
        L.append("")
    L += ["### Gate: each checkpoint against the ImageNet student at its own input size", "",
          f"On every set it did not train on: clean R@1 >= ImageNet - {100 * GATE_CLEAN_TOLERANCE:g} point; "
          f"on each link the gain over ImageNet >= {GATE_RECOVERY:g} x ImageNet's loss on that link "
          "(R@1_t,clean - R@1_t,link). Margin = gain - needed; its 90 % interval comes from 2,000 paired "
          "bootstrap resamples of the set's queries (an interval across 0: the verdict is within the noise "
          "of that set). `beats`: strictly better than ImageNet on the link. Points of R@1.", ""]
    L += ["| model | set | domain | link | ImageNet | model | needed gain | gain | verdict | margin, 90 % "
          "interval | beats |", "|---|---|---|---|---:|---:|---:|---:|---|---|---|"]
    for c in ckpts:
        m = models[c["key"]]
        for k, rows in m["gate"].items():
            for r in rows:
                beats = "-" if r["beats"] is None else ("yes" if r["beats"] else "no")
                ci = r.get("margin_ci90")
                ci_text = "-" if ci is None else f"{100 * ci[0]:+.1f} .. {100 * ci[1]:+.1f}"
                L.append(f"| `{c['key']}` | {k} | {m['domains'][k]} | {_link_title(r['link'])} | "
                         f"{_p(r['teacher'])} | {_p(r['student'])} | {100 * r['needed']:+.1f} | "
                         f"{100 * r['gain']:+.1f} | {'PASS' if r['pass'] else '**FAIL**'} | {ci_text} | "
                         f"{beats} |")
    L += ["", "Verdicts over the out-of-domain sets: " + "; ".join(
        f"`{c['key']}` gate {'PASS' if models[c['key']]['gate_out_of_domain_pass'] else 'FAIL'}, beats "
        f"ImageNet on every link {'yes' if models[c['key']]['beats_baseline_out_of_domain'] else 'no'}"
        for c in ckpts) + ".", "", END]
    return "\n".join(L) + "\n"


def write_block(page: Path, block: str) -> Path:
    """Replace the cross-domain block of ``page`` (or insert it before "## What this shows", else append)."""
    text = page.read_text(encoding="utf-8") if page.is_file() else "# Results\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block.rstrip("\n") + rest.split(END, 1)[1]
    elif "\n## What this shows" in text:
        head, tail = text.split("\n## What this shows", 1)
        text = head.rstrip("\n") + "\n\n" + block + "\n## What this shows" + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block
    atomic_write_text(page, text)
    return page
