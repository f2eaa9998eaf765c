"""Shared plumbing of the benchmarks: machine description, load sampling, interleaved timing,
results.json (keyed by benchmark name, newest run last) and markdown tables.

Timings on a shared machine are noisy, so every benchmark compares variants *within one run*:
variants are timed in alternation (a shuffled order per repeat) and ratios are taken per repeat
between neighbours in time, then the median over repeats is reported.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import platform
import random
import resource
import statistics
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results.json"
SHARED = Path(os.environ.get("VPR_ROS_SHARED", REPO.parent / "shared")).resolve()

if str(REPO) not in sys.path:  # run as `python bench/x.py` from anywhere
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCH_HOME", str(REPO / ".cache" / "torch"))


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def versions(*modules: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in modules:
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except ImportError:
            out[name] = "absent"
    return out


def machine(*modules: str) -> dict[str, Any]:
    """CPU model, cores (online / usable by this process), load average, OS, library versions."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    info: dict[str, Any] = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable, "loadavg_start": loadavg(),
        "platform": platform.platform(), "versions": versions(*modules),
    }
    with contextlib.suppress(Exception):
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


class LoadSampler:
    """Samples the 1-minute load average and system CPU busy share every ``period`` s in a thread."""

    def __init__(self, period: float = 2.0) -> None:
        self.period = period
        self.load: list[float] = []
        self.busy: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _cpu() -> tuple[int, int]:
        vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle

    def _run(self) -> None:
        prev = self._cpu()
        while not self._stop.wait(self.period):
            cur = self._cpu()
            total, idle = cur[0] - prev[0], cur[1] - prev[1]
            prev = cur
            self.load.append(os.getloadavg()[0])
            if total > 0:
                self.busy.append(1.0 - idle / total)

    def __enter__(self) -> LoadSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    def summary(self) -> dict[str, Any]:
        def stats(v: list[float]) -> dict[str, float] | None:
            return {"min": round(min(v), 2), "median": round(statistics.median(v), 2),
                    "max": round(max(v), 2)} if v else None

        return {"loadavg_1m": stats(self.load), "cpu_busy_share": stats(self.busy), "loadavg_end": loadavg()}


def interleaved(variants: dict[str, Callable[[], float]], repeats: int, *, seed: int = 0,
                progress: bool = True) -> dict[str, list[float]]:
    """Run each variant's measurement ``repeats`` times, alternating variants in a shuffled order
    per repeat; returns the list of measurements (one per repeat) of each variant."""
    rng = random.Random(seed)
    out: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(repeats):
        rng.shuffle(names)
        for k in names:
            out[k].append(variants[k]())
        if progress:
            print(f"  repeat {r + 1}/{repeats} (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    return out


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over repeats of num[i] / den[i] (measurements of one repeat are close in time)."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True) if b > 0)


def median(v: Iterable[float]) -> float:
    return statistics.median(list(v))


def pct(v: Sequence[float], q: float) -> float:
    s = sorted(v)
    if not s:
        return float("nan")
    i = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[i]


def rss_mb(pid: int | None = None) -> float:
    """Current resident set size (MiB) of this process, or of process ``pid`` (NaN when it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    if pid is not None:
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ros_env() -> None:
    """Environment of the ROS benchmark processes: localhost discovery, logs and caches in the repo."""
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.setdefault("VPR_ROS_CACHE", str(REPO / ".cache"))  # ONNX exports: .cache/onnx
    os.environ.setdefault("ROS_LOG_DIR", str(REPO / ".cache" / "ros_log"))
    os.environ.setdefault("HOME", str(REPO / ".cache" / "home"))


def camera_frames(size: tuple[int, int], n: int, seq: str = "05") -> list[Any]:
    """``n`` real RGB camera frames resized to ``size`` (H, W): KITTI ``seq`` and the RTAB-Map corridor
    interleaved."""
    import cv2

    from vpr_ros.core.images import load_image

    kitti = sorted((SHARED / "data" / "kitti_first300" / seq / "image_0").glob("*.jpg"))
    rtab = sorted((SHARED / "data" / "rtabmap_loop" / "images").glob("*.jpg"))
    paths = [p for pair in zip(kitti, rtab * 4, strict=False) for p in pair][:n]
    h, w = size
    return [cv2.resize(load_image(p), (w, h), interpolation=cv2.INTER_AREA) for p in paths]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def record(name: str, payload: dict[str, Any], path: Path = RESULTS) -> None:
    """Append one run to ``results.json[name]`` (a list, newest last), under a file lock."""
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    payload = {"time": now, "argv": sys.argv[1:], **payload}
    lock = REPO / ".cache" / f"{path.name}.lock"  # outside the tree: .cache is git-ignored
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        data: dict[str, Any] = {}
        if path.is_file():
            with contextlib.suppress(json.JSONDecodeError):
                data = json.loads(path.read_text())
        data.setdefault(name, []).append(payload)
        tmp = lock.with_name(f"{path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=1, default=float) + "\n")
        os.replace(tmp, path)
    print(f"recorded in {path} under {name!r}")


def table(rows: Sequence[dict[str, Any]], cols: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """A markdown table of ``rows`` (dicts) with the given columns (floats to 3 significant digits)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    head = list(headers or cols)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def describe_machine(m: dict[str, Any], load: dict[str, Any] | None = None) -> str:
    v = m.get("versions", {})
    text = (f"{m['cpu']}, {m['usable_cores']} usable cores (torch threads {m.get('torch_threads')}); "
            f"load average at start {m['loadavg_start']}")
    if load and load.get("loadavg_1m"):
        text += f", during run 1-min load {load['loadavg_1m']['median']} (min {load['loadavg_1m']['min']}, " \
                f"max {load['loadavg_1m']['max']})"
        if load.get("cpu_busy_share"):
            text += f", machine CPU busy {100 * load['cpu_busy_share']['median']:.0f}%"
    text += "; " + ", ".join(f"{k} {val}" for k, val in v.items())
    return text
