"""Inference backends: one model, several ways to run it, the same descriptors.

:func:`make_backend` builds one of

``"torch"``
    Eager PyTorch under ``torch.inference_mode``; ``channels_last`` memory format by default
    (faster MobileNetV2 convolutions on CPU and GPU), optional ``torch.compile`` (off by
    default: it needs a C++ toolchain and a minute of warm-up). ``precision="fp16"`` runs a
    half-precision copy of the model and needs CUDA (refused on CPU).
``"onnx"``
    ONNX Runtime on the model exported with a dynamic batch axis (and dynamic H x W when the
    model keeps native image sizes). Execution providers: TensorRT when installed and a GPU
    is used, then CUDA, else CPU. The export is cached in a directory keyed by a hash of the
    weights, the model description and the input size, so a restart loads it in milliseconds.

Every backend takes a group of equally sized RGB uint8 images and returns (N, D) float32
descriptors. Preprocessing (resize, scale, normalise) writes into buffers allocated once
per input shape and reused for every frame: a uint8 staging array (pinned on CUDA, so the
upload is asynchronous and 4x smaller than floats) and the model's float input tensor.
A backend serialises its calls (one lock), so one instance can be shared by threads.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from vpr_ros import paths
from vpr_ros.core.errors import ModelError
from vpr_ros.core.fileio import atomic_path
from vpr_ros.core.models.registry import VprModel, select_device
from vpr_ros.core.preprocess import to_tensor_batch

log = logging.getLogger(__name__)

__all__ = [
    "AUTO",
    "BACKENDS",
    "PRECISIONS",
    "InferenceBackend",
    "OnnxBackend",
    "TorchBackend",
    "default_backend",
    "default_cache_dir",
    "find_int8_export",
    "quantize_int8",
    "make_backend",
    "model_hash",
    "usable_cpus",
]

#: ``auto`` (the default of the nodes and the CLI) is :func:`default_backend`: onnx on CPU, torch on CUDA.
AUTO = "auto"
BACKENDS = (AUTO, "torch", "onnx")
PRECISIONS = ("fp32", "fp16", "int8")
#: ONNX metadata key of a calibrated int8 export: the :func:`model_hash` of the model it was made from.
INT8_HASH_KEY = "vpr_ros.model_hash"
#: ONNX opset of exported models (ONNX Runtime >= 1.14 runs it; TensorRT 8.6+ parses it).
ONNX_OPSET = 17
_EXPORT_SAMPLE_SIZE = (240, 320)  # H, W used to trace models that keep native sizes


def usable_cpus() -> int:
    """CPU cores this process may run on (affinity/cgroup-aware where the OS says so)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def default_backend(device: str | torch.device = "auto") -> str:
    """The backend ``"auto"`` means: ``"torch"`` when ``device`` is (or ``auto`` finds) CUDA, else
    ``"onnx"`` (ONNX Runtime: several times faster than eager torch on CPU) when onnxruntime is
    installed, else ``"torch"``."""
    kind = device.type if isinstance(device, torch.device) else str(device or "auto").lower()
    if kind.startswith("cuda") or (kind == "auto" and torch.cuda.is_available()):
        return "torch"
    try:
        import onnx  # noqa: F401  (the export)
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return "onnx"


def default_cache_dir() -> Path:
    """``$VPR_ROS_CACHE/onnx``, else ``$XDG_CACHE_HOME/vpr_ros/onnx``, else ``~/.cache/vpr_ros/onnx``."""
    return paths.cache_dir("onnx")


def model_hash(model: VprModel) -> str:
    """sha256 over the model description and every state-dict tensor (name, dtype, shape, bytes).

    Independent of device and memory format, so the same weights always give the same hash.
    """
    h = hashlib.sha256()
    h.update(json.dumps(model.describe(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu", memory_format=torch.contiguous_format)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def _resize_into(image: np.ndarray, dst: np.ndarray) -> None:
    """Resize an RGB uint8 image into ``dst`` (H, W, 3): area when shrinking, bilinear when enlarging
    (the same rule as :func:`vpr_ros.core.extract.resize_rgb`)."""
    h, w = dst.shape[:2]
    if image.shape[:2] == (h, w):
        dst[...] = image
        return
    shrink = h * w < image.shape[0] * image.shape[1]
    cv2.resize(image, (w, h), dst=dst, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


class _InputBuffers:
    """Reused preprocessing buffers for up to ``capacity`` images of one (H, W).

    ``staging``: uint8 (B, H, W, 3) host array (pinned when the device is CUDA); ``tensor``: the
    model input (B, 3, H, W) on ``device`` in ``dtype`` and ``memory_format``. Normalisation is
    folded into one multiply-subtract: ``x * 1/(255 std) - mean/std``.
    """

    def __init__(self, capacity: int, size: tuple[int, int], device: torch.device, dtype: torch.dtype,
                 memory_format: torch.memory_format, mean: Sequence[float], std: Sequence[float]) -> None:
        h, w = size
        self.capacity, self.size = capacity, (h, w)
        cuda = device.type == "cuda"
        staging = torch.empty((capacity, h, w, 3), dtype=torch.uint8, pin_memory=cuda)
        self.staging_t = staging
        self.staging = staging.numpy()
        self.upload = torch.empty_like(staging, device=device) if cuda else None
        shape = (capacity, 3, h, w)
        self.work = torch.empty(shape, dtype=torch.float32, device=device, memory_format=memory_format)
        self.tensor = (self.work if dtype == torch.float32 else
                       torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format))
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.bias = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) / std_t
        self.non_blocking = cuda
        # On CPU the conversion runs in numpy: single-threaded and steady. torch's OpenMP ops on a
        # busy machine (more runnable threads than cores) can take 50x longer on a few-MB tensor.
        self._cpu = None if cuda else (self.work.numpy(), self.scale.numpy(), self.bias.numpy())

    def fill(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Preprocess ``images`` (RGB uint8) into the reused input tensor; returns its first N rows."""
        n = len(images)
        for i, im in enumerate(images):
            _resize_into(im, self.staging[i])
        if self._cpu is not None:
            work, scale, bias = self._cpu
            np.multiply(self.staging[:n].transpose(0, 3, 1, 2), scale, out=work[:n])
            np.subtract(work[:n], bias, out=work[:n])
            if self.tensor is not self.work:
                self.tensor[:n].copy_(self.work[:n])
            return self.tensor[:n]
        src = self.staging_t[:n]
        if self.upload is not None:
            self.upload[:n].copy_(src, non_blocking=self.non_blocking)
            src = self.upload[:n]
        work = self.work[:n]
        work.copy_(src.permute(0, 3, 1, 2))  # uint8 NHWC -> float NCHW (or channels_last), no temporaries
        work.mul_(self.scale).sub_(self.bias)
        if self.tensor is not self.work:
            self.tensor[:n].copy_(work)
        return self.tensor[:n]


class InferenceBackend:
    """Base class: preprocessing into reused buffers, then :meth:`run` on the model input.

    ``model`` is the torch module the backend was made from (on its device for ``torch``,
    the untouched CPU model for ``onnx``); ``dim`` the descriptor length.
    """

    kind: str = ""

    def __init__(self, model: VprModel, device: torch.device, precision: str, max_batch: int) -> None:
        self.model = model
        self.device = device
        self.precision = precision
        self.max_batch = max(1, int(max_batch))
        self.preprocess = model.preprocess
        self.dim = int(model.descriptor_dim)
        self._lock = threading.Lock()
        self._buffers: _InputBuffers | None = None

    # subclasses say where and how their input lives
    _input_device: torch.device = torch.device("cpu")
    _input_dtype: torch.dtype = torch.float32
    _input_format: torch.memory_format = torch.contiguous_format

    def _buffers_for(self, n: int, size: tuple[int, int]) -> _InputBuffers:
        buf = self._buffers
        if buf is None or buf.size != size or buf.capacity < n:  # first call, or a new native size
            buf = _InputBuffers(max(n, self.max_batch), size, self._input_device, self._input_dtype,
                                self._input_format, self.preprocess.mean, self.preprocess.std)
            self._buffers = buf
        return buf

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, D) float32 descriptors of RGB uint8 (H, W, 3) images, all of one size when the model
        keeps native sizes (``preprocess.input_size is None``)."""
        if not len(images):
            return np.empty((0, self.dim), np.float32)
        size = self.preprocess.input_size or tuple(images[0].shape[:2])
        with self._lock:
            out = []
            for s in range(0, len(images), self.max_batch):
                chunk = images[s : s + self.max_batch]
                x = self._buffers_for(len(chunk), size).fill(chunk)
                out.append(self.run(x))
        return out[0] if len(out) == 1 else np.concatenate(out)

    def run(self, x: torch.Tensor) -> np.ndarray:
        """Descriptors of a preprocessed (B, 3, H, W) batch as float32 numpy."""
        raise NotImplementedError

    def warmup(self, batch: int = 1, size: tuple[int, int] | None = None) -> None:
        """Run a dummy batch so lazy initialisation (kernels, memory plans) is not paid by a frame."""
        h, w = self.preprocess.input_size or size or _EXPORT_SAMPLE_SIZE
        self([np.zeros((h, w, 3), np.uint8)] * max(1, batch))

    def describe(self) -> dict[str, Any]:
        """What runs: kind, device, precision and backend-specific details (for logs/diagnostics)."""
        return {"kind": self.kind, "device": str(self.device), "precision": self.precision}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.describe().items())})"


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one (``cuda`` without an index is the current CUDA device)."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


class TorchBackend(InferenceBackend):
    """Eager PyTorch (``channels_last`` by default), optionally ``torch.compile``-d, fp32 or fp16 (CUDA).

    ``threads`` sets torch's intra-op threads for the whole process (``torch.set_num_threads``).
    On CPU cores shared with other busy processes, torch's OpenMP pool with more than one thread
    can be an order of magnitude slower than one thread (its workers spin-wait at every op);
    use ``threads=1`` there, or start the process with ``OMP_WAIT_POLICY=PASSIVE``.
    """

    kind = "torch"

    def __init__(self, model: VprModel, *, device: torch.device, precision: str = "fp32", max_batch: int = 32,
                 channels_last: bool = True, compile: bool = False, threads: int | None = None) -> None:
        if precision == "fp16":
            if device.type != "cuda":
                raise ModelError(f"precision fp16 needs a CUDA device (got {device}); half-precision "
                                 "convolutions on CPU are slower and less accurate than fp32: use fp32")
            model = copy.deepcopy(model).half()  # leave the caller's fp32 model as it is
        elif not _same_device(next(model.parameters()).device, device):
            model = copy.deepcopy(model)  # leave the caller's model where it is (a CPU model stays usable)
        super().__init__(model, device, precision, max_batch)
        if threads:  # process-wide: torch has one intra-op pool per process
            torch.set_num_threads(int(threads))
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device).eval()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self.compiled = bool(compile)
        self._net = torch.compile(self.model) if compile else self.model
        self._input_device = device
        self._input_dtype = torch.float16 if precision == "fp16" else torch.float32
        self._input_format = fmt

    def run(self, x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            y = self._net(x)
            return y.float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "channels_last": self.channels_last, "compile": self.compiled,
                "threads": torch.get_num_threads() if self.device.type == "cpu" else None}


def _ort():
    try:
        import onnxruntime  # optional extra "fast"
    except ImportError as exc:
        raise ModelError("backend 'onnx' needs onnxruntime: pip install 'vpr_ros[fast]' "
                         "(onnxruntime or onnxruntime-gpu, and onnx for the export)") from exc
    return onnxruntime


class OnnxBackend(InferenceBackend):
    """ONNX Runtime on the exported model (cached by weights hash and input size).

    ``threads``: intra-op threads on CPU (default: the usable cores); ``spin``: let idle ORT
    threads busy-wait between ops (faster by a little on a quiet machine, but burns the cores
    other threads of a node need; off by default). ``providers`` overrides the provider choice.
    """

    kind = "onnx"

    def __init__(self, model: VprModel, *, device: torch.device, precision: str = "fp32", max_batch: int = 32,
                 cache_dir: str | os.PathLike | None = None, threads: int | None = None, spin: bool = False,
                 providers: Sequence[str | tuple[str, dict]] | None = None) -> None:
        ort = _ort()
        available = ort.get_available_providers()
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        if providers is None:
            providers = self._choose_providers(device, precision, available, cache)
        elif precision == "fp16":
            raise ModelError("backend 'onnx' with precision fp16: give no explicit providers "
                             "(fp16 runs through TensorRT's trt_fp16_enable)")
        super().__init__(model, device, precision, max_batch)
        if precision == "int8":
            self.path, self.exported = find_int8_export(model, cache), False
        else:
            self.path, self.exported = export_onnx(model, cache)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.threads = int(threads) if threads else usable_cpus()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.spin = bool(spin)
        opts.log_severity_level = 3
        def session() -> Any:
            return ort.InferenceSession(str(self.path), sess_options=opts, providers=list(providers))

        try:
            self.session = session()
        except Exception as exc:  # a damaged cache file is exported again, once; anything else is fatal
            if self.exported:
                raise ModelError(f"ONNX Runtime could not load {self.path}: {exc}") from exc
            log.warning("cached ONNX export %s does not load (%s); exporting again", self.path, exc)
            self.path.unlink(missing_ok=True)
            self.path, self.exported = export_onnx(model, cache)
            try:
                self.session = session()
            except Exception as exc2:
                raise ModelError(f"ONNX Runtime could not load {self.path}: {exc2}") from exc2
        self.providers = self.session.get_providers()
        if device.type == "cuda" and self.providers[0] == "CPUExecutionProvider":
            raise ModelError(f"device {device} requested but ONNX Runtime fell back to CPU "
                             f"(providers available: {available})")
        self._input_name = self.session.get_inputs()[0].name

    @staticmethod
    def _choose_providers(device: torch.device, precision: str, available: Sequence[str],
                          cache: Path) -> list:
        if precision == "int8":
            if device.type != "cpu":
                raise ModelError("precision int8 (a calibrated int8 ONNX export) runs on CPU; use fp32 or "
                                 "fp16 on CUDA")
            return ["CPUExecutionProvider"]
        if device.type == "cpu":
            if precision == "fp16":
                raise ModelError("precision fp16 needs a CUDA device; use fp32 on CPU")
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" not in available:
            raise ModelError(f"device {device} requested for backend 'onnx' but ONNX Runtime has no CUDA "
                             f"provider (available: {', '.join(available)}); install onnxruntime-gpu")
        cuda_opts = {"device_id": device.index or 0}
        providers: list = []
        if "TensorrtExecutionProvider" in available:
            providers.append(("TensorrtExecutionProvider", {
                "device_id": device.index or 0,
                "trt_fp16_enable": precision == "fp16",
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache / "trt"),
            }))
        elif precision == "fp16":
            raise ModelError("backend 'onnx' with fp16 needs ONNX Runtime's TensorRT provider; "
                             "use backend 'torch' with precision fp16 on CUDA instead")
        return [*providers, ("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]

    def run(self, x: torch.Tensor) -> np.ndarray:
        (out,) = self.session.run(None, {self._input_name: x.numpy()})
        return np.asarray(out, dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": self.providers, "threads": self.threads, "spin": self.spin,
                "onnx": str(self.path)}


def int8_folders(cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where calibrated int8 exports are looked for: the packaged weights folder, then ``cache_dir``."""
    return [Path(__file__).resolve().parents[1] / "weights", Path(cache_dir or default_cache_dir())]


def _int8_hash(path: Path) -> str | None:
    try:
        import onnx  # optional extra "fast"

        m = onnx.load(str(path), load_external_data=False)
    except Exception:  # not an ONNX file: not a match
        return None
    return next((p.value for p in m.metadata_props if p.key == INT8_HASH_KEY), None)


def find_int8_export(model: VprModel, cache_dir: str | os.PathLike | None = None) -> Path:
    """The calibrated int8 export (``*.int8.onnx``) made from exactly ``model`` (weights, description and
    input size: :func:`model_hash`), from :func:`int8_folders`; ModelError naming how to make one if none."""
    want = model_hash(model)
    for folder in int8_folders(cache_dir):
        for path in sorted(folder.glob("*.int8.onnx")) if folder.is_dir() else []:
            if _int8_hash(path) == want:
                return path
    raise ModelError(f"precision int8: no calibrated int8 export of this {model.name} (model hash "
                     f"{want[:12]}) in {', '.join(str(f) for f in int8_folders(cache_dir))}; make one with "
                     "`python bench/int8.py --weights WEIGHTS --export`, or use precision fp32")


#: Activation-range calibration of :func:`quantize_int8`: ``minmax`` (ONNX Runtime's default: the
#: extremes over all calibration images), ``moving-average`` (the mean of each image's extremes: rare
#: outliers no longer set the range). ONNX Runtime's histogram methods (percentile, entropy) fail on this
#: model ("Too many bins for data range": a tensor of near-constant values) and are not offered.
CALIBRATIONS = ("minmax", "moving-average")


def quantize_int8(model: VprModel, calibration: Sequence[np.ndarray], out: str | os.PathLike, *,
                  cache_dir: str | os.PathLike | None = None, per_channel: bool = True,
                  calibrate: str = "minmax") -> Path:
    """Static int8 quantization (ONNX Runtime, QDQ, int8 weights per channel, uint8 activations with
    ranges from ``calibrate``, one of :data:`CALIBRATIONS`) of ``model``'s fp32 export, calibrated on
    ``calibration`` (RGB uint8 images, preprocessed as the backend does). Writes ``out`` (atomically) with
    the model's hash in its metadata, which :func:`find_int8_export` matches."""
    import onnx  # optional extra "fast"
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise ModelError("int8 calibration needs at least one image")
    if calibrate not in CALIBRATIONS:
        raise ModelError(f"int8 calibration {calibrate!r}: expected one of {', '.join(CALIBRATIONS)}")
    extra = {"CalibMovingAverage": calibrate == "moving-average"}
    src, _ = export_onnx(model, cache_dir or default_cache_dir())
    name = onnx.load(str(src), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            image = next(self.items, None)
            return None if image is None else {name: to_tensor_batch([image], model.preprocess).numpy()}

    out = Path(out)
    with atomic_path(out) as tmp, atomic_path(out.with_suffix(".pre.onnx")) as pre:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, extra_options=extra)
        q = onnx.load(str(tmp))
        onnx.helper.set_model_props(q, {INT8_HASH_KEY: model_hash(model),
                                        "vpr_ros.calibration_images": str(len(calibration)),
                                        "vpr_ros.calibration": calibrate})
        onnx.save(q, str(tmp))
    out.with_suffix(".pre.onnx").unlink(missing_ok=True)
    return out


def onnx_cache_path(model: VprModel, cache_dir: str | os.PathLike) -> Path:
    """Where the export of ``model`` (its weights and input size) lives in ``cache_dir``."""
    size = model.preprocess.input_size
    tag = f"{size[0]}x{size[1]}" if size else "dynamic"
    key = hashlib.sha256(f"{model_hash(model)}|{tag}|opset{ONNX_OPSET}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{model.name or type(model).__name__}-{key}-{tag}.onnx"


def export_onnx(model: VprModel, cache_dir: str | os.PathLike, *, verify: bool = True) -> tuple[Path, bool]:
    """Export ``model`` to ONNX in ``cache_dir`` unless a valid export is already there.

    Batch is a dynamic axis; H and W are fixed to ``preprocess.input_size`` (dynamic when it is
    None). A fresh export is checked against the torch model on one random batch (max abs
    difference <= 1e-4). Returns (path, True when exported now / False when reused).
    """
    path = onnx_cache_path(model, cache_dir)
    if path.is_file() and path.stat().st_size > 0:
        return path, False
    try:
        import onnx  # noqa: F401  (torch's exporter needs it; fail with a clear message)
    except ImportError as exc:
        raise ModelError("exporting to ONNX needs the onnx package: pip install 'vpr_ros[fast]'") from exc
    net = copy.deepcopy(model).to("cpu", torch.float32).to(memory_format=torch.contiguous_format).eval()
    size = model.preprocess.input_size
    h, w = size or _EXPORT_SAMPLE_SIZE
    sample = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    axes = {0: "batch"} if size else {0: "batch", 2: "height", 3: "width"}
    log.info("exporting %s to ONNX (%s) at %s", model.name, "x".join(map(str, size or ("H", "W"))), path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        try:
            torch.onnx.export(net, (sample,), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["images"], output_names=["descriptors"],
                              dynamic_axes={"images": axes, "descriptors": {0: "batch"}})
        except Exception as exc:
            raise ModelError(f"ONNX export of {model.name} failed: {type(exc).__name__}: {exc}") from exc
        if verify:
            _verify_export(tmp, net, sample)
    return path, True


def _verify_export(path: Path, net: torch.nn.Module, sample: torch.Tensor, atol: float = 1e-4) -> None:
    ort = _ort()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        ref = net(sample).numpy()
    (got,) = sess.run(None, {sess.get_inputs()[0].name: sample.numpy()})
    err = float(np.abs(got - ref).max())
    if not err <= atol:
        raise ModelError(f"ONNX export disagrees with the torch model (max abs diff {err:.2e} > {atol:.0e})")


def make_backend(
    model: VprModel,
    kind: str = "torch",
    *,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    max_batch: int = 32,
    **options: Any,
) -> InferenceBackend:
    """Build the ``kind`` backend (``"torch"``, ``"onnx"``, or ``"auto"``: :func:`default_backend`) of
    ``model`` on ``device``.

    ``device``: ``auto`` (CUDA when torch — or for onnx, ONNX Runtime — has it), ``cpu``,
    ``cuda[:N]``. ``precision``: ``fp32``, ``fp16`` (CUDA only) or ``int8`` (onnx on CPU, from a
    calibrated export: :func:`find_int8_export`). ``options`` go to the
    backend: torch ``channels_last`` (True), ``compile`` (False), ``threads``; onnx ``cache_dir``,
    ``threads``, ``spin`` (False), ``providers``. Unknown kinds, precisions or options raise
    :class:`ModelError`.
    """
    if kind == AUTO:
        kind = default_backend(device)
    if kind not in BACKENDS:
        raise ModelError(f"unknown inference backend {kind!r}; expected one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    allowed = {"torch": {"channels_last", "compile", "threads"},
               "onnx": {"cache_dir", "threads", "spin", "providers"}}[kind]
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ModelError(f"backend {kind!r} has no option(s) {', '.join(unknown)} "
                         f"(allowed: {', '.join(sorted(allowed))})")
    if isinstance(device, torch.device):
        dev = device
    elif kind == "onnx" and (device or "auto").lower() == "auto":
        cuda = "CUDAExecutionProvider" in _ort().get_available_providers() and torch.cuda.is_available()
        dev = torch.device("cuda" if cuda else "cpu")
    else:
        dev = select_device(device)
    if kind == "torch":
        if precision == "int8":
            raise ModelError("precision int8 runs on backend 'onnx' (a calibrated int8 ONNX export)")
        return TorchBackend(model, device=dev, precision=precision, max_batch=max_batch, **options)
    return OnnxBackend(model, device=dev, precision=precision, max_batch=max_batch, **options)
