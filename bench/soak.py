"""Soak: 10,000 camera frames through the localizer node over loopback DDS, with memory and accounting.

Run it confined to this machine (a loopback-only network namespace)::

    scripts/confine.sh .venv/bin/python bench/soak.py [--frames 10000] [--rate auto] [--bad-share 0.01]

Three processes: this orchestrator; the localizer node as deployed (``python -m
vpr_ros.ros.localizer_node``, its own ``main()``, mode ``localize``, a map of 300 KITTI-00 frames,
``backend`` onnx by default); and a camera process. Both ROS processes run with
``FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA``. The camera publishes 320x240 ``rgb8`` frames (KITTI 05
and the RTAB-Map corridor, cycled) at a fixed rate, about 1% of them bad (wrong encoding, step
mismatch, empty, NaN float image, oversized header, in turn), receives ``PlaceMatch`` and the
node's ``/diagnostics``. The orchestrator samples the node's RSS every second.

``--rate auto`` measures the model first (the same backend on the same frames, batch 1, in a
plain loop) and offers 40% of that, at most 25 Hz, so the node keeps up on shared cores.

Reported: RSS at the end of the warm-up (first ``--warmup`` frames) and at the end, growth and
slope after warm-up (goal <= 50 MB); drops; and the accounting, from the node's own counters:
every frame sent is matched (a PlaceMatch came back), dropped by policy (``queue_drops``),
rejected (``rejected_total``) or lost in transport before the node saw it (``sent -
frames_received``); ``sent == matched + dropped + rejected + lost`` must hold exactly, and the
rejections must be the bad frames.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import _common as C  # first: sets sys.path and TORCH_HOME
import numpy as np

NAME = "soak"
BAD_KINDS = ("wrong_encoding", "step_mismatch", "empty", "nan_float", "huge_header")


def bad_frame(kind: str, header: Any) -> Any:
    """A raw ``sensor_msgs/Image`` the node must reject (kinds as in test/test_robustness.py)."""
    from sensor_msgs.msg import Image

    if kind == "wrong_encoding":
        return Image(header=header, height=2, width=2, encoding="bayer_rggb8", step=2, data=bytes(4))
    if kind == "step_mismatch":
        return Image(header=header, height=4, width=4, encoding="rgb8", step=9, data=bytes(36))
    if kind == "empty":
        return Image(header=header, height=0, width=0, encoding="rgb8", step=0)
    if kind == "nan_float":
        arr = np.full((8, 8), np.nan, np.float32)
        return Image(header=header, height=8, width=8, encoding="32FC1", step=32, data=arr.tobytes())
    if kind == "huge_header":
        return Image(header=header, height=20000, width=20000, encoding="rgb8", step=60000, data=bytes(16))
    raise ValueError(kind)


# --------------------------------------------------------------------------- camera process


def role_pub(args: argparse.Namespace) -> int:
    """Publish the frames at the rate, collect PlaceMatch and /diagnostics; print one JSON result line."""
    C.ros_env()
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header
    from vpr_ros_msgs.msg import PlaceMatch

    from vpr_ros.ros.conversions import float_to_stamp, rgb_to_image_msg

    size = tuple(int(v) for v in args.input_size.split("x"))
    msgs = [rgb_to_image_msg(f, "rgb8") for f in C.camera_frames(size, 120)]
    rclpy.init()
    node = rclpy.create_node(f"soak_camera_{uuid.uuid4().hex[:6]}")
    lock = threading.Lock()
    matched: set[int] = set()
    diag: dict[str, str] = {}
    diag_name = f"vpr_ros: {args.node_name}"

    def on_match(msg: PlaceMatch) -> None:
        with lock:
            matched.add(int(msg.header.frame_id.rsplit("_", 1)[1]))

    def on_diag(msg: DiagnosticArray) -> None:
        for st in msg.status:
            if st.name == diag_name:
                with lock:
                    diag.clear()
                    diag.update({kv.key: kv.value for kv in st.values})

    match_sub = node.create_subscription(PlaceMatch, args.match_topic, on_match, QoSProfile(depth=1000))
    node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, QoSProfile(depth=50))
    pub = node.create_publisher(Image, args.image_topic, qos_profile_sensor_data)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    deadline = time.time() + 60
    while pub.get_subscription_count() == 0 or match_sub.get_publisher_count() == 0:  # matched both ways
        if time.time() > deadline:
            print(json.dumps({"error": "the node did not connect within 60 s"}), flush=True)
            return 1
        time.sleep(0.05)
    time.sleep(1.0)
    every = max(1, round(1.0 / args.bad_share)) if args.bad_share > 0 else 0
    bad_sent, bad_kinds = 0, {k: 0 for k in BAD_KINDS}
    t0 = time.perf_counter()
    print(json.dumps({"started": time.time()}), flush=True)
    for i in range(args.frames):
        delay = t0 + i / args.rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        header = Header(stamp=float_to_stamp(time.time()), frame_id=f"cam_{i}")
        if every and i % every == every // 2:
            kind = BAD_KINDS[bad_sent % len(BAD_KINDS)]
            pub.publish(bad_frame(kind, header))
            bad_sent += 1
            bad_kinds[kind] += 1
        else:
            msg = msgs[i % len(msgs)]
            msg.header = header
            pub.publish(msg)
        if i % 500 == 0:
            print(json.dumps({"progress": i, "t": time.perf_counter() - t0}), flush=True)
    send_s = time.perf_counter() - t0

    def settled() -> bool:  # the node finished every frame it received, and its matches arrived
        with lock:
            if not diag:
                return False
            done = int(diag["frames_processed"]) + int(diag["queue_drops"]) + int(diag["rejected_total"])
            return done == int(diag["frames_received"]) and len(matched) >= int(diag["frames_processed"])

    deadline = time.time() + args.drain
    stable = 0
    while time.time() < deadline and stable < 3:  # three diagnostics periods in a row
        stable = stable + 1 if settled() else 0
        time.sleep(1.05)
    with lock:
        final = dict(diag)
        n_matched = len(matched)
    result = {
        "sent": args.frames,
        "bad_sent": bad_sent,
        "bad_kinds": bad_kinds,
        "matched": n_matched,
        "send_s": send_s,
        "offered_hz": args.rate,
        "settled": stable >= 3,
        "diagnostics": final,
    }
    print(json.dumps({"result": result}), flush=True)
    executor.shutdown()
    spin.join(timeout=10)
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


# --------------------------------------------------------------------------- orchestrator


def bare_rate(args: argparse.Namespace, frames: list[np.ndarray], seconds: float = 6.0) -> float:
    """Frames/s of the node's model and backend called in a plain loop, batch 1, preprocessing included."""
    from vpr_ros.core.localizer import build_extractor

    ext, _ = build_extractor(
        args.weights, "", args.input_size, "cpu", 1, backend=args.backend, threads=args.threads
    )
    ext.backend([frames[0]])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ext.backend([frames[n % len(frames)]])
        n += 1
    return n / (time.perf_counter() - t0)


def read_json(proc: subprocess.Popen, until: str, timeout: float, on_line=None) -> dict | None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            return None
        if line.startswith("{"):
            item = json.loads(line)
            if on_line:
                on_line(item)
            if until in item:
                return item
    return None


def orchestrate(args: argparse.Namespace) -> int:
    C.ros_env()
    os.environ.setdefault("VPR_ROS_CACHE", str(C.REPO / ".cache"))
    from vpr_ros.core.localizer import build_extractor
    from vpr_ros.data.places import load_kitti
    from vpr_ros.eval.offline import map_from_records

    size = tuple(int(v) for v in args.input_size.split("x"))
    mach = C.machine("torch", "onnxruntime", "numpy", "rclpy")
    mach["confined"] = os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE")
    print("machine:", mach, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="vpr_soak_"))
    ext, label = build_extractor(args.weights, "", args.input_size, "cpu", 16)
    pmap, _, _ = map_from_records(
        ext, load_kitti(C.SHARED / "data" / "kitti_first300", sequence="00").database, model=label,
        progress=False,
    )
    map_dir = pmap.save(tmp / "kitti00")
    del ext
    frames = C.camera_frames(size, 40)
    bare = bare_rate(args, frames)
    rate = min(25.0, max(5.0, 0.4 * bare)) if args.rate == "auto" else float(args.rate)
    print(
        f"map {map_dir}: {len(pmap)} places; bare {args.backend} loop {bare:.1f} Hz -> "
        f"offering {rate:.1f} Hz for {args.frames} frames ({args.frames / rate / 60:.1f} min)",
        flush=True,
    )
    topic = f"/soak_{uuid.uuid4().hex[:8]}"
    image_topic, match_topic, node_name = f"{topic}/image", f"{topic}/place_match", "soak_localizer"
    env = {**os.environ, "FASTDDS_BUILTIN_TRANSPORTS": "LARGE_DATA", "PYTHONUNBUFFERED": "1"}
    params = {
        "map_path": map_dir,
        "mode": "localize",
        "weights": args.weights,
        "input_size": args.input_size,
        "device": "cpu",
        "backend": args.backend,
        "threads": args.threads,
        "queue_size": args.queue_size,
        "max_batch": args.max_batch,
        "image_topic": image_topic,
        "match_topic": match_topic,
        "diagnostics_period_s": 1.0,
    }
    cmd = [sys.executable, "-m", "vpr_ros.ros.localizer_node", "--ros-args", "-r", f"__node:={node_name}"]
    for k, v in params.items():
        cmd += ["-p", f"{k}:={v}"]
    log_path = tmp / "node.log"
    with open(log_path, "w") as log:
        node = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=C.REPO)
    pub = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--role",
            "pub",
            "--input-size",
            args.input_size,
            "--image-topic",
            image_topic,
            "--match-topic",
            match_topic,
            "--node-name",
            node_name,
            "--frames",
            str(args.frames),
            "--rate",
            str(rate),
            "--bad-share",
            str(args.bad_share),
            "--drain",
            str(args.drain),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    samples: list[tuple[float, float]] = []  # (seconds since the first frame, node RSS MiB)
    started: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            if started:
                samples.append((time.time() - started[0], C.rss_mb(node.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = None
    try:
        with C.LoadSampler() as load:

            def on_line(item: dict) -> None:
                if "started" in item:
                    started.append(item["started"])
                    samples.append((0.0, C.rss_mb(node.pid)))
                elif "progress" in item:
                    print(
                        f"  {item['progress']:6d} frames sent, {item['t']:.0f} s, node RSS "
                        f"{C.rss_mb(node.pid):.0f} MiB",
                        flush=True,
                    )

            out = read_json(pub, "result", 120 + args.frames / rate + args.drain, on_line)
            result = out["result"] if out else None
        stop.set()
        sampler.join(timeout=5)
        pub.wait(timeout=30)
    finally:
        node.send_signal(signal.SIGINT)
        try:
            node_rc = node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
            node_rc = None
        if pub.poll() is None:
            pub.kill()
    if result is None:
        sys.exit(f"the camera process gave no result; node log: {log_path}")
    d = result["diagnostics"]
    sent, matched = result["sent"], result["matched"]
    received = int(d["frames_received"])
    dropped, rejected = int(d["queue_drops"]), int(d["rejected_total"])
    lost = sent - received
    rejected_by = {
        k[len("rejected_") :]: int(v)
        for k, v in d.items()
        if k.startswith("rejected_") and k != "rejected_total"
    }
    warm_s = args.warmup / rate
    after = [(t, r) for t, r in samples if t >= warm_s and r == r]
    rss_warm, rss_end = after[0][1], after[-1][1]
    slope = float(np.polyfit([t for t, _ in after], [r for _, r in after], 1)[0]) if len(after) > 2 else 0.0
    row = {
        "frames": sent,
        "offered_hz": round(rate, 2),
        "bare_hz": round(bare, 1),
        "backend": args.backend,
        "send_s": round(result["send_s"], 1),
        "matched": matched,
        "queue_drops": dropped,
        "rejected": rejected,
        "transport_lost": lost,
        "bad_sent": result["bad_sent"],
        "rejected_by_reason": rejected_by,
        "node_frames_processed": int(d["frames_processed"]),
        "out_of_order": int(d.get("out_of_order", 0)),
        "accounting_exact": sent == matched + dropped + rejected + lost
        and matched == int(d["frames_processed"]),
        "rejections_are_the_bad_frames": rejected == result["bad_sent"],
        "settled": result["settled"],
        "rss_start_mib": round(samples[0][1], 1),
        "rss_after_warmup_mib": round(rss_warm, 1),
        "rss_end_mib": round(rss_end, 1),
        "rss_max_mib": round(max(r for _, r in samples if r == r), 1),
        "rss_growth_after_warmup_mib": round(rss_end - rss_warm, 1),
        "rss_slope_mib_per_1000_frames": round(slope * 1000 / rate, 2),
        "latency_p50_ms": float(d.get("latency_p50_ms", "nan")),
        "latency_p95_ms": float(d.get("latency_p95_ms", "nan")),
        "mean_batch": float(d.get("mean_batch", "nan")),
        "node_exit": node_rc,
        "warmup_frames": args.warmup,
        "rss_samples": [(round(t, 1), round(r, 1)) for t, r in samples[:: max(1, len(samples) // 200)]],
    }
    summary = load.summary()
    print()
    print(C.describe_machine(mach, summary))
    print(
        C.table(
            [row],
            [
                "frames",
                "offered_hz",
                "matched",
                "queue_drops",
                "rejected",
                "transport_lost",
                "rss_after_warmup_mib",
                "rss_end_mib",
                "rss_growth_after_warmup_mib",
                "rss_slope_mib_per_1000_frames",
                "latency_p50_ms",
                "latency_p95_ms",
            ],
            [
                "frames",
                "offered Hz",
                "matched",
                "dropped (queue)",
                "rejected",
                "lost in transport",
                "RSS after warm-up MiB",
                "RSS end MiB",
                "growth MiB",
                "MiB / 1000 frames",
                "p50 ms",
                "p95 ms",
            ],
        )
    )
    print(
        f"accounting: sent {sent} = matched {matched} + dropped {dropped} + rejected {rejected} "
        f"+ lost {lost}: "
        f"{'exact' if row['accounting_exact'] else 'MISMATCH'}; rejected by reason {rejected_by} "
        f"(bad frames sent {result['bad_sent']}: {result['bad_kinds']}); node exit status {node_rc}; "
        f"RSS growth after warm-up {row['rss_growth_after_warmup_mib']} MiB "
        f"({'within' if row['rss_growth_after_warmup_mib'] <= 50 else 'OVER'} the 50 MB goal)"
    )
    rss = [r for _, r in samples if r == r]
    print(
        f"RSS over the run (MiB): start {rss[0]:.0f}, median {statistics.median(rss):.0f}, "
        f"max {max(rss):.0f}, end {rss[-1]:.0f}; node log {log_path}"
    )
    if not args.no_record:
        C.record(
            NAME,
            {
                "machine": mach,
                "load": summary,
                "input_size": args.input_size,
                "max_batch": args.max_batch,
                "queue_size": args.queue_size,
                "bad_share": args.bad_share,
                "row": row,
            },
        )
    ok = row["accounting_exact"] and row["rejections_are_the_bad_frames"]
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", default="orchestrate", choices=["orchestrate", "pub"])
    ap.add_argument("--frames", type=int, default=10_000)
    ap.add_argument("--rate", default="auto", help="offered Hz, or auto (40%% of the bare loop, at most 25)")
    ap.add_argument("--bad-share", type=float, default=0.01, help="share of bad frames (0 = none)")
    ap.add_argument("--warmup", type=int, default=1000, help="frames before the RSS baseline is taken")
    ap.add_argument("--drain", type=float, default=30.0, help="seconds to wait for the node to settle")
    ap.add_argument("--input-size", default="240x320", help="HxW of the published frames and the model input")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--backend", default="onnx")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--queue-size", type=int, default=10)
    ap.add_argument("--image-topic", default="/soak/image")
    ap.add_argument("--match-topic", default="/soak/place_match")
    ap.add_argument("--node-name", default="soak_localizer")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.role == "pub":
        args.rate = float(args.rate)
        return role_pub(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
