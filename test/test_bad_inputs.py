"""Bad inputs that used to lose data, fail silently or end in a traceback (docs/robustness.md).

Each test reproduces one case as a user meets it (the CLI through ``vpr_ros.cli.main.main``, a node on a
real rclpy graph) and checks the rule of every entry point: one clear line naming the file and the
reason, a non-zero exit where the job could not be done, and no good output replaced by a worse one.

A full disk is real: a tiny tmpfs mounted in a private mount namespace (``unshare -m``, root only;
those tests skip with the reason elsewhere).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from vpr_ros.cli.main import main
from vpr_ros.core.errors import DatasetError, ImageError, ModelError, VprError
from vpr_ros.core.images import encode_png, load_image
from vpr_ros.core.mapdb import PlaceMap

REPO = Path(__file__).resolve().parents[1]
LATIN1 = b"caf\xe9"  # "café" in Latin-1: not valid UTF-8


def run_cli(argv: list, capsys) -> tuple[int, str, list[str]]:
    """``vpr-ros ARGV``: exit status, stdout, and the ``error:`` lines of stderr (never a traceback)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return rc, out, [line for line in err.splitlines() if ": error: " in line]


def noise_images(folder: Path, n: int, *, shape: tuple[int, int] = (48, 64), suffix: str = ".png",
                 seed: int = 0) -> list[Path]:
    """``n`` random RGB images (incompressible: a PNG of 48x64 is ~9 KB), named 000.png ..."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        path = folder / f"{i:03d}{suffix}"
        ok, buf = cv2.imencode(suffix, img[:, :, ::-1])
        assert ok
        path.write_bytes(buf.tobytes())
        paths.append(path)
    return paths


def png_claiming(width: int, height: int) -> bytes:
    """A 4x4 PNG whose IHDR is rewritten to claim ``width`` x ``height`` (CRC fixed, data unchanged)."""
    data = bytearray(encode_png(np.zeros((4, 4, 3), np.uint8)))
    assert data[12:16] == b"IHDR"
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """An 8x8 JPEG whose SOF0 segment is rewritten to claim ``width`` x ``height``."""
    ok, buf = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    data = bytearray(buf.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


# --------------------------------------------------------------------------- a real full disk


def _small_disk_unavailable() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux to mount a small tmpfs (a real full disk)"
    if shutil.which("unshare") is None:
        return "needs unshare(1) (util-linux)"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a private mount namespace here: {probe.stderr.strip()}"
    return None


def on_small_disk(disk: Path, kib: int, code: str, *args: object) -> dict:
    """Run Python ``code`` with a ``kib`` KiB tmpfs mounted at ``disk`` (in a private mount namespace,
    so it vanishes with the process); ``sys.argv[1:]`` are ``args``. The code reports by writing JSON to
    the path in the environment variable RESULT (outside the small disk); that JSON is returned, with
    ``stderr`` added."""
    why = _small_disk_unavailable()
    if why:
        pytest.skip(why)
    disk.mkdir(parents=True, exist_ok=True)
    result = disk.parent / f"{disk.name}.result.json"
    script = 'mount -t tmpfs -o size="$1"k vpr_test_disk "$2" && shift 2 && exec "$@"'
    cmd = ["unshare", "-m", "sh", "-c", script, "sh", str(kib), str(disk), sys.executable, "-c",
           textwrap.dedent(code), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path.cwd(), timeout=300,
                          env={**os.environ, "RESULT": str(result)})
    assert result.is_file(), f"the script reported nothing (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(result.read_text())
    report["stderr"] = proc.stderr
    return report


DEGRADE_ON_FULL_DISK = """
    import json, os, sys
    from pathlib import Path
    import numpy as np
    from vpr_ros.cli.main import main
    from vpr_ros.core.images import load_image, save_image

    src, disk = Path(sys.argv[1]), Path(sys.argv[2])
    out = disk / "out"

    def listing():
        files = sorted((out / "none").iterdir()) if (out / "none").is_dir() else []
        return {p.name: p.read_bytes().hex() for p in files}

    def intact(name):  # the written image is what was sent, bit for bit
        return bool(np.array_equal(load_image(out / "none" / name), load_image(src / name)))

    def run(argv):
        try:
            return main(argv)
        except BaseException as exc:  # a traceback in the CLI: reported as such
            return f"raised {type(exc).__name__}: {exc}"

    argv = ["degrade", "--images", str(src), "--spec", "none", "--out", str(out)]
    rc1 = run(argv)
    first = listing()
    rc2 = run(argv)  # again on the full disk: what was written must survive
    second = listing()
    report = {"rc": [rc1, rc2], "first": first, "second_same": first == second,
              "intact": {n: intact(n) for n in first if n.endswith(".png") and not n.startswith(".")
                         and (out / "none" / n).stat().st_size}}
    try:  # the writer itself: no file at all after a failed write
        save_image(disk / "big.png", np.random.default_rng(0).integers(0, 256, (400, 400, 3), np.uint8))
        report["save_image"] = "no error"
    except Exception as exc:
        report["save_image"] = f"{type(exc).__name__}: {exc}"
    report["big_exists"] = (disk / "big.png").exists()
    report["leftovers"] = sorted(p.name for p in disk.rglob(".*"))
    Path(os.environ["RESULT"]).write_text(json.dumps(report))
"""


def test_degrade_on_a_full_disk_exits_2_and_leaves_only_complete_images(tmp_path):
    """Item 2: 40 images (~9 KB each as PNG) onto a 96 KiB disk. The run stops at the first failed
    write with one error line and status 2; every file left is a complete image (no zero-byte PNG, no
    temporary file), and a second run on the still-full disk replaces none of them."""
    src = tmp_path / "src"
    noise_images(src, 40)
    r = on_small_disk(tmp_path / "disk", 96, DEGRADE_ON_FULL_DISK, src, tmp_path / "disk")
    assert all(len(data) > 0 for data in r["first"].values()), "zero-byte images were left"
    assert r["rc"] == [2, 2], r["stderr"][-2000:]
    errors = [line for line in r["stderr"].splitlines() if ": error: " in line]
    assert len(errors) == 2 and "Traceback" not in r["stderr"], r["stderr"][-2000:]
    assert "No space left on device" in errors[0] and "stopped after" in errors[0], errors[0]
    assert 0 < len(r["first"]) < 40
    assert all(not name.startswith(".") for name in r["first"]), r["first"].keys()  # no temp files
    assert r["intact"] and all(r["intact"].values()), r["intact"]
    assert r["second_same"]
    assert r["save_image"].startswith("OutputError") and "No space left" in r["save_image"], r["save_image"]
    assert not r["big_exists"] and r["leftovers"] == []


MAP_ON_FULL_DISK = """
    import json, os, sys
    from pathlib import Path
    import numpy as np
    from vpr_ros.core.errors import VprError
    from vpr_ros.core.mapdb import PlaceMap

    disk = Path(sys.argv[1])
    rng = np.random.default_rng(0)
    small = PlaceMap(64, model="m")
    small.add(rng.standard_normal((3, 64)).astype(np.float32))
    path = small.save(disk / "site")
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)  # fill the disk to the last block
    try:
        while os.write(fd, bytes(4096)):
            pass
    except OSError:
        pass
    os.close(fd)
    big = PlaceMap(64, model="m")
    big.add(rng.standard_normal((400, 64)).astype(np.float32))  # 100 KB of index
    report = {}
    try:
        big.save(disk / "site")
        report["error"] = None
    except Exception as exc:  # not a VprError: the CLI would print a traceback
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["clear"] = isinstance(exc, VprError)
    report["entries_after"] = len(PlaceMap.load(path))
    report["files"] = sorted(p.name for p in path.iterdir())
    Path(os.environ["RESULT"]).write_text(json.dumps(report))
"""


def test_map_save_on_a_full_disk_is_one_line_and_keeps_the_old_map(tmp_path):
    """Item 9: faiss write_index fails on a full disk: a MapError (one line, exit 2 in the CLI) saying
    the map saved before is unchanged, and it still loads with its 3 entries."""
    r = on_small_disk(tmp_path / "disk", 64, MAP_ON_FULL_DISK, tmp_path / "disk")
    assert r["error"] is not None, "saving 400 entries onto a full disk succeeded"
    assert r["clear"] and r["error"].startswith("MapError: cannot save map to"), r["error"]
    assert "\n" not in r["error"]
    assert "No space left on device" in r["error"] and "unchanged" in r["error"]
    assert r["entries_after"] == 3
    assert not [f for f in r["files"] if f.endswith(".tmp") or "tmp" in f.split("-")[0]], r["files"]


# --------------------------------------------------------------------------- build-map


@pytest.fixture
def good_map(tmp_path) -> Path:
    """A saved 3-entry map of the gem_mobilenetv2 descriptor size (320)."""
    m = PlaceMap(320, model="gem_mobilenetv2")
    m.add(np.eye(320, dtype=np.float32)[:3])
    return m.save(tmp_path / "site")


def _manifest(path: Path) -> bytes:
    return (path / "manifest.json").read_bytes()


def test_build_map_of_unreadable_images_keeps_the_existing_map(good_map, torch_home, tmp_path, capsys):
    """Item 3: every image unreadable: exit 2 naming the count and the first reason; the good map on
    disk is untouched (same manifest, 3 entries)."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))  # truncated PNG
    before = _manifest(good_map)
    rc, _, errors = run_cli(["build-map", "--images", bad, "--model", "gem_mobilenetv2", "--input-size",
                             "48x64", "--device", "cpu", "--out", good_map], capsys)
    assert rc == 2 and len(errors) == 1, errors
    assert "none of the 3 images could be described" in errors[0] and "left unchanged" in errors[0], errors
    assert _manifest(good_map) == before and len(PlaceMap.load(good_map)) == 3


# --------------------------------------------------------------------------- degrade


def test_kbps_link_reports_the_achieved_rate_and_flags_frames_over_budget(nordland_dir, tmp_path, capsys):
    """Item 4: kbps:1@10 gives 1000 / 8 / 10 = 12.5 bytes per frame; no 64x32 JPEG is that small (the
    headers alone are ~300 B), so every frame is flagged and the achieved rate is printed."""
    from vpr_ros.core.transmission import TransmissionConfig, Transmitter

    frames = [load_image(p) for p in sorted((nordland_dir / "winter").glob("*.png"))[100:105]]
    tx = Transmitter(TransmissionConfig.parse("kbps:1@10"))
    sent = [tx.process(f) for f in frames]
    assert [s.over_budget for s in sent] == [True] * 5
    st = tx.stats
    assert st["budget_bytes"] == pytest.approx(12.5) and st["budget_kbps"] == 1
    # achieved kbps = mean bytes * 8 bit * 10 fps / 1000
    assert st["kbps"] == pytest.approx(sum(s.nbytes for s in sent) / 5 * 8 * 10 / 1000)
    assert st["kbps"] > 10 and st["over_budget"] == 5
    ok = Transmitter(TransmissionConfig.parse("kbps:2000@10"))  # 25 000 B per frame: every frame fits
    assert not any(ok.process(f).over_budget for f in frames) and ok.stats["over_budget"] == 0

    src = tmp_path / "src"
    src.mkdir()
    for f in sorted((nordland_dir / "winter").glob("*.png"))[100:105]:
        shutil.copy(f, src / f.name)
    rc, out, errors = run_cli(["degrade", "--images", src, "--spec", "kbps:1@10", "--out", tmp_path / "o"],
                              capsys)
    assert rc == 0 and not errors
    assert "kbps1@10fps: achieved" in out and "for a 1 kbps budget (12.5 B/frame)" in out, out
    assert "5 of 5 frames over budget" in out, out


def test_eval_reports_frames_over_a_bitrate_budget(nordland_dir, torch_home, tmp_path, capsys):
    """Item 4 in eval: results.json carries the budget and the frames over it, the table a summary."""
    out = tmp_path / "eval"
    rc, text, errors = run_cli(["eval", "--dataset", "nordland", "--root", nordland_dir, "--every", "300",
                                "--model", "gem_mobilenetv2", "--input-size", "32x64", "--device", "cpu",
                                "--degrade", "kbps:1@10", "--out", out], capsys)
    assert rc == 0 and not errors
    extra = json.loads((out / "results.json").read_text())["results"][0]["extra"]
    assert extra["budget_kbps"] == 1 and extra["frames_sent"] > 0
    assert extra["frames_over_budget"] == extra["frames_sent"]
    assert f"{extra['frames_sent']} of {extra['frames_sent']} frames over budget" in text, text


def test_same_stem_different_suffix_do_not_overwrite_each_other(tmp_path, capsys):
    """Item 7: frame.png and frame.jpg in one folder: two outputs, each the image it came from."""
    src = tmp_path / "src"
    png = noise_images(src / "a", 1, seed=1)[0].rename(src / "frame.png")
    jpg = noise_images(src / "b", 1, seed=2, suffix=".jpg")[0].rename(src / "frame.jpg")
    shutil.rmtree(src / "a")
    shutil.rmtree(src / "b")
    (src / "sub").mkdir()
    shutil.copy(png, src / "sub" / "other.png")  # a name without a twin keeps the plain name
    rc, _, errors = run_cli(["degrade", "--images", src, "--spec", "none", "--out", tmp_path / "o"], capsys)
    assert rc == 0 and not errors
    out = tmp_path / "o" / "none"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == [
        "frame.jpg.png", "frame.png.png", "sub/other.png"]
    assert np.array_equal(load_image(out / "frame.png.png"), load_image(png))
    assert np.array_equal(load_image(out / "frame.jpg.png"), load_image(jpg))
    # names that would still collide are refused before anything is written
    from vpr_ros.cli.main import degrade_targets

    with pytest.raises(VprError, match="would both be written to"):
        degrade_targets([src / "x.png", src / "x.jpg", src / "x.jpg.png"], src)


@pytest.mark.parametrize("kind", ["png_40000", "jpeg_20000", "bmp_30000"])
def test_image_header_above_the_pixel_limit_is_refused_before_decoding(tmp_path, capsys, kind):
    """Item 8: a small file whose header claims a huge image is refused from its header (no decode,
    no cv2.error traceback); degrade skips it with a warning and writes the others."""
    from vpr_ros.core.images import MAX_PIXELS, decode_image

    if kind == "png_40000":
        data, size, suffix = png_claiming(40000, 40000), (40000, 40000), ".png"
    elif kind == "jpeg_20000":  # under OpenCV's own limit: the header check must refuse it undecoded (1.2 GB)
        data, size, suffix = jpeg_claiming(20000, 20000), (20000, 20000), ".jpg"
    else:
        ok, buf = cv2.imencode(".bmp", np.zeros((2, 2, 3), np.uint8))
        data = bytearray(buf.tobytes())
        data[18:26] = (30000).to_bytes(4, "little") + (30000).to_bytes(4, "little", signed=True)
        data, size, suffix = bytes(data), (30000, 30000), ".bmp"
    src = tmp_path / "src"
    noise_images(src, 2)
    (src / f"huge{suffix}").write_bytes(data)
    rc, out, errors = run_cli(["degrade", "--images", src, "--spec", "none", "--out", tmp_path / "o"], capsys)
    assert rc == 0 and not errors
    assert sorted(p.name for p in (tmp_path / "o" / "none").iterdir()) == ["000.png", "001.png"]
    row = out.splitlines()[1].split()  # degradation, frames, bytes/frame, kbps, skipped, folder
    assert (row[0], row[1], row[4]) == ("none", "2", "1"), out
    assert size[0] * size[1] > MAX_PIXELS
    with pytest.raises(ImageError, match=rf"huge: image {size[0]}x{size[1]} exceeds the {MAX_PIXELS}-pixel "
                                         r"limit \(read from its header; not decoded\)"):
        decode_image(data, name="huge")
    from vpr_ros.core.images import encoded_size

    assert encoded_size(data) == size


def test_image_within_the_limit_still_decodes():
    """The header reader agrees with the decoder on ordinary images (PNG, JPEG, BMP, gray PNG)."""
    from vpr_ros.core.images import decode_image, encoded_size

    img = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for ext in (".png", ".jpg", ".bmp"):
        ok, buf = cv2.imencode(ext, img)
        assert encoded_size(buf) == (53, 37), ext
        assert decode_image(buf).shape == (37, 53, 3)
    ok, buf = cv2.imencode(".png", img[:, :, 0])
    assert encoded_size(buf.tobytes()) == (53, 37)


# --------------------------------------------------------------------------- checkpoints


def _checkpoint(tmp_path: Path, name: str, **change) -> Path:
    """A deployed gem_mobilenetv2 checkpoint with some of its contents replaced."""
    import torch

    from vpr_ros.core.models import create_model, save_checkpoint

    path = save_checkpoint(create_model("gem_mobilenetv2", pretrained=False), tmp_path / "ok.pt")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "input_size" in change:
        ckpt["model"]["preprocess"]["input_size"] = change["input_size"]
    if "state_dict" in change:
        ckpt["state_dict"] = change["state_dict"]
    torch.save(ckpt, tmp_path / name)
    return tmp_path / name


def test_checkpoint_input_size_has_an_upper_bound(tmp_path, capsys):
    """Item 10: input_size 100000x100000 in a checkpoint (or --input-size) is refused before any
    allocation, naming the allowed range. (No image is given: before, the size was accepted and the
    run went on to the next error; with an image it allocated 100000x100000 frames.)"""
    from vpr_ros.core.models import read_checkpoint

    path = _checkpoint(tmp_path, "huge.pt", input_size=[100000, 100000])
    rc, _, errors = run_cli(["build-map", "--images", tmp_path, "--weights", path, "--device", "cpu",
                             "--out", tmp_path / "m"], capsys)
    assert rc == 2 and len(errors) == 1, errors
    assert f"{path}: preprocessing input_size 100000x100000 (HxW) is out of range" in errors[0], errors
    rc, _, errors = run_cli(["build-map", "--images", tmp_path, "--model", "gem_mobilenetv2",
                             "--input-size", "100000x100000", "--device", "cpu", "--out", tmp_path / "m"],
                            capsys)
    assert rc == 2 and len(errors) == 1 and "out of range" in errors[0], errors
    from vpr_ros.core.models.registry import MAX_INPUT_SIDE

    with pytest.raises(ModelError, match=rf"100000x100000 .*each side must be in 16..{MAX_INPUT_SIDE}"):
        read_checkpoint(path)


def test_wrong_architecture_checkpoint_is_summarised(tmp_path, capsys):
    """Item 14: ResNet weights in a gem_mobilenetv2 checkpoint: "checkpoint is for a ResNet", in one
    short line, not the full list of missing and unexpected keys (11.6 KB before)."""
    import torchvision

    resnet = torchvision.models.resnet18(weights=None).state_dict()
    path = _checkpoint(tmp_path, "resnet.pt", state_dict=resnet)
    rc, _, errors = run_cli(["build-map", "--images", tmp_path, "--weights", path, "--device", "cpu",
                             "--out", tmp_path / "m"], capsys)
    assert rc == 2 and len(errors) == 1, errors
    assert f"{path}: checkpoint is for a ResNet, expected 'gem_mobilenetv2' (" in errors[0], errors[0]
    assert "weights missing" in errors[0] and len(errors[0]) < 500, errors[0]


# --------------------------------------------------------------------------- bags


def test_sqlite_bag_folder_without_metadata_is_one_clear_error(kitti_dir, tmp_path):
    """Item 11: a rosbag2 folder whose metadata.yaml is gone: DatasetError naming the file and the fix,
    from every reader (the replay's is tested on a graph below)."""
    pytest.importorskip("rosbags")
    from vpr_ros.data.bags import bag_topics, iter_bag_images
    from vpr_ros.data.dataset_bags import make_dataset_bag, read_messages

    bag = Path(make_dataset_bag("kitti", kitti_dir, tmp_path / "k", storage="sqlite3", limit=3)["bag"])
    (bag / "metadata.yaml").unlink()
    for read in (bag_topics, lambda p: list(iter_bag_images(p, "/camera/image_raw")), read_messages):
        with pytest.raises(DatasetError, match=r"needs metadata.yaml, which is missing \(it holds k.db3\)"):
            read(bag)


# --------------------------------------------------------------------------- --out checked first


def test_unwritable_out_is_reported_before_the_run(nordland_dir, tmp_path, capsys):
    """Item 12: --out below a regular file: exit 2 at once, before any image is degraded or any model
    is loaded (eval printed its traceback only after the whole run)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for argv in (["degrade", "--images", nordland_dir / "winter", "--spec", "none"],
                 ["eval", "--dataset", "nordland", "--root", nordland_dir, "--every", "300", "--model",
                  "gem_mobilenetv2", "--input-size", "32x64", "--device", "cpu"]):
        rc, out, errors = run_cli([*argv, "--out", blocker / "out"], capsys)
        assert rc == 2 and len(errors) == 1, errors
        assert f"{blocker / 'out'}: output folder cannot be created ({blocker} is not a folder)" in errors[0]
        assert "R@1" not in out and not (tmp_path / "file").is_dir()


# --------------------------------------------------------------------------- names that are not UTF-8


def test_display_path_is_valid_utf8_and_reversible():
    """Item 13: undecodable bytes of a name appear as \\xNN; valid names are unchanged."""
    from vpr_ros.core.fileio import display_path

    raw = os.fsdecode(LATIN1 + b".png")  # 'caf\\udce9.png' on a UTF-8 file system
    assert display_path(raw) == "caf\\xe9.png"
    assert display_path(LATIN1 + b".png") == "caf\\xe9.png"
    assert display_path(Path("/tmp") / raw) == "/tmp/caf\\xe9.png"
    assert display_path("café ✓.png") == "café ✓.png"
    assert display_path("\udce9").encode("utf-8")  # any str: encodable


def test_non_utf8_names_print_on_a_strict_utf8_stdout(tmp_path):
    """Item 13: degrade of a folder with a skipped Latin-1 file name, into a Latin-1 --out, with
    stdout strict UTF-8 (PYTHONIOENCODING): the names are printed escaped, exit 0."""
    src = tmp_path / "src"
    noise_images(src, 2)
    bad = os.fsdecode(bytes(src) + b"/" + LATIN1 + b".png")
    Path(bad).write_bytes(b"not an image")
    out = os.fsdecode(bytes(tmp_path) + b"/out" + LATIN1)
    proc = subprocess.run([sys.executable, "-m", "vpr_ros.cli", "degrade", "--images", str(src), "--spec",
                           "none", "--out", out], capture_output=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C.UTF-8"})
    stdout, stderr = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")  # both valid UTF-8
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert "skipped" in stderr and "caf\\xe9.png: not a decodable image" in stderr, stderr
    assert f"{tmp_path}/outcaf\\xe9/none" in stdout, stdout
    assert len(list(Path(out, "none").iterdir())) == 2


# --------------------------------------------------------------------------- messages


def test_misleading_messages_are_plain(nordland_dir, tmp_path, capsys):
    """Item 14: h264:-1 names the QP range; a FIFO is "not a regular file" (and never blocks); make-bag
    of Nordland summer's black first frames says they were dropped as dark, and a winter bag says
    which of its frames were left out."""
    from vpr_ros.core.transmission import TransmissionConfig, TransmissionError

    with pytest.raises(TransmissionError, match="qp must be in 0..51, got -1"):
        TransmissionConfig.parse("h264:-1")
    fifo = tmp_path / "frame.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match=r"frame.png: not a regular file \(a FIFO\)"):
        load_image(fifo)
    with pytest.raises(ImageError, match="not a regular file \\(a folder\\)"):
        load_image(tmp_path)

    pytest.importorskip("rosbags")
    rc, _, errors = run_cli(["make-bag", "--dataset", "nordland", "--root", nordland_dir, "--season",
                             "summer", "--limit", "5", "--out", tmp_path / "summer"], capsys)
    assert rc == 2 and len(errors) == 1, errors
    assert "every selected frame was dropped (5 dark;" in errors[0], errors[0]
    assert "summer/images-00010.png: dark: mean intensity 0.2 < 3" in errors[0], errors[0]
    assert not (tmp_path / "summer").exists()
    rc, out, errors = run_cli(["make-bag", "--dataset", "nordland", "--root", nordland_dir, "--season",
                               "winter", "--every", "3", "--limit", "4", "--out", tmp_path / "w"], capsys)
    assert rc == 0 and not errors
    # winter's first 17 frames are one frozen picture: of frames 0, 3, 6, 9 only the first is kept
    assert "1 nordland_winter frames" in out and "3 selected frames left out (3 frozen;" in out, out


# --------------------------------------------------------------------------- ROS: --set, replay


def test_set_of_an_unknown_node_lists_the_valid_ones(capsys):
    """Item 6: --set nosuchnode.x=1 is an error naming the nodes (it was silently ignored)."""
    pytest.importorskip("rclpy")
    from vpr_ros.core.errors import ConfigError
    from vpr_ros.ros.graph import apply_sets

    with pytest.raises(ConfigError, match="unknown node 'nosuchnode'; nodes: transmitter, localizer, "
                                          "loop_closure"):
        apply_sets({}, ["nosuchnode.x=1"])
    with pytest.raises(ConfigError, match="unknown parameter.*top_kk"):
        apply_sets({}, ["localizer.top_kk=1"])
    assert apply_sets({}, ["*.use_sim_time=true"]) == {"*": {"use_sim_time": True}}
    latin1 = os.fsdecode(b"localizer.map_path=/maps/" + LATIN1)  # from argv: not UTF-8
    with pytest.raises(ConfigError, match=r"map_path=/maps/caf\\xe9: not valid UTF-8 text"):
        apply_sets({}, [latin1])
    rc, _, errors = run_cli(["localize", "--params", REPO / "config" / "localize.yaml", "--duration", "1",
                             "--set", "nosuchnode.x=1"], capsys)
    assert rc == 2 and len(errors) == 1 and "unknown node 'nosuchnode'" in errors[0], errors


def test_replay_failure_names_frames_without_matches():
    """Item 1/5: a finished replay that published frames but got no PlaceMatch back, or had no frame at
    all, is a failure (the CLI exits 2 with this line)."""
    pytest.importorskip("rclpy")
    from vpr_ros.ros.replay import replay_failure

    report = {"bag": "b", "image_topic": "/camera/image_raw", "mode": "localize", "frames_published": 24,
              "place_matches": 0, "lost_in_transport": 0,
              "localizer": {"frames_processed": 24, "rejected_total": 0, "publish_failed": 24}}
    assert replay_failure(report) == ("24 frames replayed but no PlaceMatch came back (localizer: 24 "
                                      "processed, 0 rejected, 24 not published; lost in transport 0)")
    assert replay_failure({**report, "frames_published": 0}) == (
        "b: no image message on /camera/image_raw; nothing replayed")
    assert replay_failure({**report, "place_matches": 24}) is None
    assert replay_failure({**report, "mode": "map"}) is None  # map mode publishes no PlaceMatch


@pytest.fixture(scope="module")
def replay_rig(kitti_dir, tmp_path_factory, torch_home):
    """A 4-frame KITTI bag, an ImageNet extractor and a map of those frames whose sources are Latin-1
    file names."""
    pytest.importorskip("ros_support")
    from vpr_ros.core.localizer import build_extractor
    from vpr_ros.core.mapdb import MapEntry
    from vpr_ros.data.dataset_bags import make_dataset_bag

    tmp = tmp_path_factory.mktemp("bad_inputs_replay")
    bag = Path(make_dataset_bag("kitti", kitti_dir, tmp / "k.mcap", limit=4)["bag"])
    ext, label = build_extractor("imagenet", "", "48x64", "cpu", 8)
    from vpr_ros.data.bags import read_image_bag

    frames = read_image_bag(bag, "/camera/image_raw", "/odom")
    m = PlaceMap(ext.dim, model=label)
    names = [os.fsdecode(LATIN1 + f"_{i}.png".encode()) for i in range(len(frames))]
    m.add(ext([f.image for f in frames]), [MapEntry(stamp=f.stamp, source=n, position=(*f.position, 0.0))
                                            for f, n in zip(frames, names, strict=True)])
    return {"tmp": tmp, "bag": bag, "ext": (ext, label), "map": m.save(tmp / "latin1")}


@pytest.mark.ros
@pytest.mark.usefixtures("ros_env")
def test_replay_publishes_matches_for_a_map_with_latin1_sources(replay_rig):
    """Item 1: every frame's PlaceMatch is published (it raised UnicodeEncodeError: 0 of N published,
    exit 0); the recorded sources are the names with \\xNN escapes."""
    from vpr_ros.data.dataset_bags import read_messages
    from vpr_ros.ros.replay import ReplayConfig, run_replay

    rig = replay_rig
    r = run_replay(ReplayConfig(bag=rig["bag"], map_path=rig["map"], out_dir=rig["tmp"] / "latin1_out",
                                fast=True, top_k=2, extractor=rig["ext"], record=rig["tmp"] / "rec"))
    assert r["frames_published"] == 4 and r["place_matches"] == 4, r
    matches = [m for _, m in read_messages(rig["tmp"] / "rec")["/vpr/place_match"]]
    sources = {c.source for m in matches for c in m.matches}
    assert sources and sources <= {f"caf\\xe9_{i}.png" for i in range(4)}, sources
    assert r["publish_failed"] == 0 and r["localizer"]["publish_failed"] == 0


@pytest.mark.ros
@pytest.mark.usefixtures("ros_env")
def test_replay_of_a_bag_without_images_exits_2_with_a_strict_report(replay_rig, capsys):
    """Item 5: a bag whose image topic has no message: exit 2, "no image message", and report.json
    is strict JSON (no NaN) with zero frames."""
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    rig = replay_rig
    empty = rig["tmp"] / "empty"
    ts = get_typestore(Stores.ROS2_HUMBLE)
    with Writer(empty, version=8) as w:
        w.add_connection("/camera/image_raw", "sensor_msgs/msg/Image", typestore=ts)
    out = rig["tmp"] / "empty_out"
    rc, _, errors = run_cli(["replay", "--bag", empty, "--map", rig["map"], "--out", out, "--weights",
                             "imagenet", "--input-size", "48x64", "--device", "cpu", "--fast"], capsys)
    assert rc == 2 and len(errors) == 1, errors
    assert f"{empty}: no image message on /camera/image_raw; nothing replayed" in errors[0], errors

    def no_nan(token: str) -> float:
        raise AssertionError(f"report.json holds {token}")

    report = json.loads((out / "report.json").read_text(), parse_constant=no_nan)
    assert report["frames_published"] == 0 and report["place_matches"] == 0


@pytest.mark.ros
@pytest.mark.usefixtures("ros_env")
def test_replay_of_a_bag_folder_without_metadata_is_one_line(replay_rig, kitti_dir, capsys):
    """Item 11 in replay: no FileNotFoundError traceback; the bag and the missing file are named."""
    from vpr_ros.data.dataset_bags import make_dataset_bag

    rig = replay_rig
    bag = Path(make_dataset_bag("kitti", kitti_dir, rig["tmp"] / "nometa", storage="sqlite3", limit=2)["bag"])
    (bag / "metadata.yaml").unlink()
    rc, _, errors = run_cli(["replay", "--bag", bag, "--map", rig["map"], "--out", rig["tmp"] / "nm_out",
                             "--weights", "imagenet", "--input-size", "48x64", "--device", "cpu", "--fast"],
                            capsys)
    assert rc == 2 and len(errors) == 1, errors
    assert f"vpr-ros replay: error: {bag}: a rosbag2 folder needs metadata.yaml" in errors[0], errors


def test_nan_free_statistics_of_nothing():
    """The replay report writer turns NaN / inf (statistics of zero samples) into null."""
    pytest.importorskip("rclpy")
    from vpr_ros.ros.replay import _finite

    assert _finite({"a": [math.nan, 1.0, math.inf], "b": {"c": -math.inf}, "d": "x"}) == {
        "a": [None, 1.0, None], "b": {"c": None}, "d": "x"}
