"""Localizer node end to end over a real loopback DDS graph, versus the bare model in a loop.

Run it confined to this machine (a loopback-only network namespace)::

    scripts/confine.sh .venv/bin/python bench/node_e2e.py [--backends onnx,torch/t1] [--rates 10,30,120]

Three processes: this orchestrator, the localizer node (``vpr_ros.ros.localizer_node.LocalizerNode``,
mode ``localize``, a map of 300 KITTI-00 frames, its backend chosen by its ``backend`` /
``threads`` / ``faiss_threads`` parameters, spun as ``localizer_node``'s ``main()`` does: a
``SingleThreadedExecutor`` and a 0.5 ms GIL switch interval), and a publisher/receiver started with
``FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA``. The publisher sends real camera frames (KITTI 05 and
RTAB-Map corridor, resized to the input size, ``rgb8`` ``sensor_msgs/Image``, header stamp = send
time) at each rate for ``--duration`` seconds and receives ``vpr_ros_msgs/PlaceMatch``:

* sustained rate = PlaceMatch received for that phase / phase duration;
* latency = receive time - image header stamp (same clock), p50 / p99;
* drops = frames sent - PlaceMatch received (node queue drops + transport losses);
* node RSS (VmRSS of the node process, max over the phase);
* CPU: node CPU ms per matched frame (all its threads: DDS, executor, worker), versus the bare
  loop's CPU ms per frame (the ROS overhead, independent of how busy the machine is), and the
  cores the node and the publisher (the "camera") used.

The last rate should exceed what the node can do: its sustained rate there is the node's
throughput. The bare model = the same student and backend called on the same frames in a
plain loop, batch 1 (``bare_backend``), and the student's plain eager ``forward`` on
preprocessed tensors (``bare_eager``); both are timed right before and after each node run and
averaged, so the ratio compares like load with like load.

A configuration ``backend[/tN][/fM][/multi][/swU]`` varies one setting from that: ``tN`` the
``threads`` parameter (node and bare loops), ``fM`` ``faiss_threads`` (0 = faiss default),
``multi`` a ``MultiThreadedExecutor``, ``swU`` the switch interval in µs (5000 = Python's default).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import _common as C  # first: sets sys.path and TORCH_HOME
import numpy as np

NAME = "node_e2e"
WEIGHTS = "imagenet"  # the packaged student when built: pass --weights default


# --------------------------------------------------------------------------- node process


def role_node(args: argparse.Namespace) -> int:
    C.ros_env()
    import rclpy
    from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from vpr_ros.ros.localizer_node import LocalizerNode

    params = {"image_topic": args.image_topic, "match_topic": args.match_topic, "map_path": args.map,
              "mode": "localize", "weights": args.weights, "input_size": args.input_size, "device": "cpu",
              "backend": args.backend, "threads": args.threads, "faiss_threads": args.faiss_threads,
              "max_batch": args.max_batch, "queue_size": args.queue_size, "top_k": 5,
              "diagnostics_period_s": 0.0}
    rclpy.init()
    node = LocalizerNode(parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    node.extractor.backend.warmup(batch=args.max_batch)
    print(json.dumps({"ready": True, "pid": os.getpid(), "wired": "parameter",
                      "backend": node.extractor.backend.describe()}), flush=True)
    sys.setswitchinterval(args.switch_interval_us * 1e-6)  # how long a thread may hold the GIL
    executor = SingleThreadedExecutor() if args.executor == "single" else MultiThreadedExecutor()
    executor.add_node(node)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    stop.wait()
    diag = node.diagnostics()
    executor.shutdown()
    spin.join(timeout=10)
    node.destroy_node()
    rclpy.try_shutdown()
    print(json.dumps({"diagnostics": diag}, default=str), flush=True)
    return 0


# --------------------------------------------------------------------------- publisher / receiver process


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def role_pub(args: argparse.Namespace) -> int:
    C.ros_env()
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header
    from vpr_ros_msgs.msg import PlaceMatch

    from vpr_ros.ros.conversions import float_to_stamp, rgb_to_image_msg

    size = tuple(int(v) for v in args.input_size.split("x"))
    frames = C.camera_frames(size, args.frames)
    rclpy.init()
    node = rclpy.create_node(f"bench_pub_{uuid.uuid4().hex[:6]}")
    received: dict[int, float] = {}  # seq -> receive time
    lock = threading.Lock()

    def on_match(msg: PlaceMatch) -> None:
        now = time.time()
        with lock:
            received[int(msg.header.frame_id.rsplit("_", 1)[1])] = now

    match_sub = node.create_subscription(PlaceMatch, args.match_topic, on_match, QoSProfile(depth=1000))
    pub = node.create_publisher(Image, args.image_topic, qos_profile_sensor_data)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    msgs = [rgb_to_image_msg(f, "rgb8") for f in frames]
    deadline = time.time() + 30
    while pub.get_subscription_count() == 0 or match_sub.get_publisher_count() == 0:  # matched both ways
        if time.time() > deadline:
            print(json.dumps({"error": "the node did not connect within 30 s"}), flush=True)
            return 1
        time.sleep(0.05)
    time.sleep(1.0)
    seq = 0
    phases = []
    for rate in [float(r) for r in args.rates.split(",")]:
        stamps: dict[int, float] = {}
        n = int(rate * args.duration)
        cpu_node0, cpu_pub0 = _cpu_s(args.node_pid), time.process_time()
        t0 = time.perf_counter()
        rss = []
        for i in range(n):
            target = t0 + i / rate
            delay = target - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            msg = msgs[seq % len(msgs)]
            now = time.time()
            msg.header = Header(stamp=float_to_stamp(now), frame_id=f"cam_{seq}")
            pub.publish(msg)
            stamps[seq] = now
            seq += 1
            if i % max(1, int(rate)) == 0:
                rss.append(C.rss_mb(args.node_pid))
        send_s = time.perf_counter() - t0
        cpu_pub = time.process_time() - cpu_pub0
        time.sleep(args.drain)
        cpu_node = _cpu_s(args.node_pid) - cpu_node0
        rss.append(C.rss_mb(args.node_pid))
        with lock:
            got = {s: received[s] for s in stamps if s in received}
        lat = sorted((got[s] - stamps[s]) * 1000.0 for s in got)
        phase = {"offered_hz": rate, "sent": n, "send_s": send_s, "matched": len(got), "drops": n - len(got),
                 "sustained_hz": len(got) / max(send_s, 1e-9),
                 "p50_ms": C.pct(lat, 50) if lat else None, "p99_ms": C.pct(lat, 99) if lat else None,
                 "node_rss_mib": max(r for r in rss if r == r) if any(r == r for r in rss) else None,
                 "node_cpu_ms_per_frame": 1000 * cpu_node / max(len(got), 1),
                 "node_cpu_cores": cpu_node / (send_s + args.drain), "pub_cpu_cores": cpu_pub / send_s}
        phases.append(phase)
        print(json.dumps({"phase": phase}), flush=True)
        time.sleep(0.5)
    executor.shutdown()
    spin.join(timeout=10)
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


# --------------------------------------------------------------------------- orchestrator


def bare_rates(backend_name: str, size: tuple[int, int], weights: str, frames: list[np.ndarray],
               seconds: float, threads: int = 0) -> dict[str, float]:
    """Frames/s of the student called in a loop at batch 1: through the backend (preprocessing
    included, built as the node builds it) and as a plain eager forward on ready tensors."""
    import torch

    from vpr_ros.core.localizer import build_extractor
    from vpr_ros.core.preprocess import to_tensor_batch

    ext, _ = build_extractor(weights, "", f"{size[0]}x{size[1]}", "cpu", 1, backend=backend_name,
                             threads=threads)
    model = ext.model
    tensors = [to_tensor_batch([f], model.preprocess) for f in frames]
    out = {}
    for name in ("bare_backend", "bare_eager"):
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            if name == "bare_backend":
                ext.backend([frames[n % len(frames)]])
            else:
                with torch.inference_mode():
                    model(tensors[n % len(tensors)])
            n += 1
        out[name] = n / (time.perf_counter() - t0)
        out[f"{name}_cpu_ms"] = 1000 * (time.process_time() - c0) / n
    return out


def spawn(role: str, args: argparse.Namespace, extra: list[str], env: dict[str, str] | None = None
          ) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--role", role, "--input-size", args.input_size,
           "--weights", args.weights, "--image-topic", args.image_topic,
           "--match-topic", args.match_topic, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def read_json_lines(proc: subprocess.Popen, until: str, timeout: float) -> list[dict]:
    out = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        line = line.strip()
        if line.startswith("{"):
            item = json.loads(line)
            out.append(item)
            if until in item:
                return out
        else:
            print(f"    [{proc.args[3]}] {line}", file=sys.stderr)
    return out


def orchestrate(args: argparse.Namespace) -> int:
    C.ros_env()
    import torch

    from vpr_ros.core.localizer import build_extractor
    from vpr_ros.data.places import load_kitti
    from vpr_ros.eval.offline import map_from_records

    size = tuple(int(v) for v in args.input_size.split("x"))
    mach = C.machine("torch", "onnxruntime", "numpy", "rclpy")
    mach["confined"] = os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE")
    mach["node_main"] = "SingleThreadedExecutor, switch interval 500 us, faiss_threads in the worker"
    print("machine:", mach)
    tmp = Path(tempfile.mkdtemp(prefix="vpr_bench_"))
    ext, label = build_extractor(args.weights, "", args.input_size, "cpu", 16)
    records = load_kitti(C.SHARED / "data" / "kitti_first300", sequence="00").database
    pmap, _, _ = map_from_records(ext, records, model=label, progress=False)
    map_dir = pmap.save(tmp / "kitti00")
    print(f"map {map_dir}: {len(pmap)} places ({label})", file=sys.stderr)
    frames = C.camera_frames(size, args.frames)
    results = []
    with C.LoadSampler() as load:
        default_threads = torch.get_num_threads()
        specs = args.backends.split(",")
        runs = [s for r in range(args.repeats) for s in (specs if r % 2 == 0 else specs[::-1])]
        for run, spec in enumerate(runs):
            backend, threads, faiss_threads, node_extra = parse_spec(spec, args)
            torch.set_num_threads(threads or default_threads)
            before = bare_rates(backend, size, args.weights, frames, args.bare_seconds, threads)
            topic = f"/bench_{uuid.uuid4().hex[:8]}"
            args.image_topic, args.match_topic = f"{topic}/image", f"{topic}/place_match"
            node = spawn("node", args, ["--backend", backend, "--map", str(map_dir), "--max-batch",
                                        str(args.max_batch), "--queue-size", str(args.queue_size),
                                        "--threads", str(threads),
                                        "--faiss-threads", str(faiss_threads), *node_extra])
            info = read_json_lines(node, "ready", 300)
            if not info or "ready" not in info[-1]:
                node.kill()
                sys.exit(f"node with backend {backend} did not start")
            ready = info[-1]
            pub = spawn("pub", args, ["--rates", args.rates, "--duration", str(args.duration),
                                      "--node-pid", str(ready["pid"]), "--frames", str(args.frames),
                                      "--drain", str(args.drain)],
                        env={"FASTDDS_BUILTIN_TRANSPORTS": "LARGE_DATA"})
            phases = [p["phase"] for p in read_json_lines(pub, "never", 60 + len(args.rates.split(",")) *
                                                          (args.duration + args.drain + 5)) if "phase" in p]
            pub.wait(timeout=30)
            node.send_signal(signal.SIGINT)
            diag = read_json_lines(node, "diagnostics", 60)
            node.wait(timeout=60)
            after = bare_rates(backend, size, args.weights, frames, args.bare_seconds, threads)
            torch.set_num_threads(default_threads)
            bare = {k: (before[k] + after[k]) / 2 for k in before}
            top = max((p["sustained_hz"] for p in phases), default=0.0)
            for p in phases:
                row = {"backend": spec, "run": run, "wired": ready["wired"], "node_backend": ready["backend"],
                       **p,
                       "bare_backend_hz": bare["bare_backend"], "bare_eager_hz": bare["bare_eager"],
                       "bare_backend_cpu_ms": bare["bare_backend_cpu_ms"],
                       "node_cpu_vs_bare": p["node_cpu_ms_per_frame"] / bare["bare_backend_cpu_ms"],
                       "node_max_hz": top, "node_vs_bare_backend": top / bare["bare_backend"],
                       "node_vs_bare_eager": top / bare["bare_eager"]}
                results.append(row)
                print(f"  {spec:8s} offered {p['offered_hz']:6.1f} Hz -> {p['sustained_hz']:6.1f} Hz, "
                      f"p50 {p['p50_ms']} ms p99 {p['p99_ms']} ms, drops {p['drops']}/{p['sent']}, "
                      f"RSS {p['node_rss_mib']:.0f} MiB, node CPU {p['node_cpu_ms_per_frame']:.1f} ms/frame "
                      f"({p['node_cpu_cores']:.2f} cores), publisher {p['pub_cpu_cores']:.2f} cores",
                      flush=True)
            print(f"  {spec}: node max {top:.1f} Hz; bare backend loop {bare['bare_backend']:.1f} Hz "
                  f"(x{top / bare['bare_backend']:.2f}), bare eager {bare['bare_eager']:.1f} Hz; "
                  f"node diagnostics {diag[-1]['diagnostics'] if diag else None}", flush=True)
    summary = load.summary()
    print()
    print(C.describe_machine(mach, summary))
    print(C.table(results, ["backend", "offered_hz", "sustained_hz", "p50_ms", "p99_ms", "drops", "sent",
                            "node_rss_mib", "node_cpu_ms_per_frame", "node_cpu_vs_bare", "node_cpu_cores",
                            "pub_cpu_cores", "node_vs_bare_backend", "bare_backend_hz", "bare_eager_hz"],
                  ["backend", "offered Hz", "sustained Hz", "p50 ms", "p99 ms", "drops", "sent",
                   "node RSS MiB", "node CPU ms/frame", "÷ bare CPU ms/frame", "node cores",
                   "publisher cores", "node max ÷ bare loop", "bare loop Hz", "bare eager Hz"]))
    if not args.no_record:
        C.record(NAME, {"machine": mach, "load": summary, "input_size": args.input_size,
                        "max_batch": args.max_batch, "queue_size": args.queue_size, "rows": results})
    return 0


def parse_spec(spec: str, args: argparse.Namespace) -> tuple[str, int, int, list[str]]:
    """``backend[/tN][/fM][/multi][/swU]`` -> (backend, threads N, faiss threads M, extra node arguments:
    MultiThreadedExecutor, GIL switch interval U µs); threads 0 = library default."""
    backend, *opts = spec.split("/")
    threads, faiss_threads, extra = args.threads, args.faiss_threads, []
    for o in opts:
        if o in ("single", "multi"):
            extra += ["--executor", o]
        elif o.startswith("sw"):
            extra += ["--switch-interval-us", o[2:]]
        elif o.startswith("t"):
            threads = int(o[1:])
        elif o.startswith("f"):
            faiss_threads = int(o[1:])
        else:
            raise SystemExit(f"bad backend spec {spec!r}: options are /tN (backend threads), "
                             "/fM (faiss threads), /multi (executor), /swU (GIL switch interval, µs)")
    return backend, threads, faiss_threads, extra


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", default="orchestrate", choices=["orchestrate", "node", "pub"])
    ap.add_argument("--backends", default="onnx,torch/t1,onnx/multi/sw5000/f0",
                    help="node configurations backend[/tN][/fM][/multi][/swU] (see the module docstring); "
                         "the last default is the node's main() before issue #6")
    ap.add_argument("--repeats", type=int, default=2,
                    help="runs of each configuration, in alternating order (ABC, CBA, ...)")
    ap.add_argument("--faiss-threads", type=int, default=1,
                    help="the node's faiss_threads parameter (0: faiss default)")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--executor", default="single", choices=["multi", "single"],
                    help="node process executor (the localizer's main() uses SingleThreadedExecutor)")
    ap.add_argument("--switch-interval-us", type=int, default=500,
                    help="node process sys.setswitchinterval in µs (main(): 500; Python's default: 5000)")
    ap.add_argument("--rates", default="10,20,30,45,60,120", help="offered frame rates (Hz), in order")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per rate")
    ap.add_argument("--drain", type=float, default=1.5, help="seconds to wait for late matches per rate")
    ap.add_argument("--input-size", default="240x320", help="HxW of the published frames and the model input")
    ap.add_argument("--weights", default=WEIGHTS)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--queue-size", type=int, default=10)
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--bare-seconds", type=float, default=6.0)
    ap.add_argument("--threads", type=int, default=0, help="the node's threads parameter (0: default)")
    ap.add_argument("--map", default="")
    ap.add_argument("--node-pid", type=int, default=0)
    ap.add_argument("--image-topic", default="/bench/image")
    ap.add_argument("--match-topic", default="/bench/place_match")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    return {"orchestrate": orchestrate, "node": role_node, "pub": role_pub}[args.role](args)


if __name__ == "__main__":
    sys.exit(main())
