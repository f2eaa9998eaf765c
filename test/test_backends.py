"""Inference backends: torch eager / channels_last / ONNX Runtime agree on real images; the ONNX
export cache is reused; bad names and impossible settings are refused with ModelError.

Agreement tolerances (fp32, CPU, ImageNet MobileNetV2 StructVPR student, 240x320):
max |ONNX - torch| <= 1e-4 per descriptor component and cosine >= 0.9999 per image.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from vpr_ros.core.backends import (
    InferenceBackend,
    OnnxBackend,
    TorchBackend,
    make_backend,
    model_hash,
    onnx_cache_path,
)
from vpr_ros.core.errors import ModelError
from vpr_ros.core.extract import DescriptorExtractor
from vpr_ros.core.images import load_image
from vpr_ros.core.models import Preprocess, create_model
from vpr_ros.core.preprocess import to_tensor_batch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

MAX_ABS = 1e-4
MIN_COS = 0.9999


@pytest.fixture(scope="module")
def student(torch_home):
    return create_model("structvpr_mobilenetv2", pretrained=True).eval()


@pytest.fixture(scope="module")
def real_images(nordland_dir, kitti_dir) -> list[np.ndarray]:
    nord = sorted((nordland_dir / "winter").glob("*.png"))[300:1500:300]
    kitti = sorted((kitti_dir / "00" / "image_0").glob("*.jpg"))[::75] + \
        sorted((kitti_dir / "05" / "image_0").glob("*.jpg"))[::75]
    return [load_image(p) for p in [*nord, *kitti]]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx_cache")


@pytest.fixture(scope="module")
def onnx_backend(student, cache_dir) -> OnnxBackend:
    return make_backend(student, "onnx", device="cpu", cache_dir=cache_dir, max_batch=4)


def reference(model, images) -> np.ndarray:
    with torch.inference_mode():
        return model(to_tensor_batch(images, model.preprocess)).numpy()


def agree(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    return float(np.abs(a - b).max()), float((a * b).sum(1).min())


def test_onnx_and_torch_agree_on_real_images(student, onnx_backend, real_images):
    ref = reference(student, real_images)
    for backend in (onnx_backend, make_backend(student, "torch", device="cpu"),
                    make_backend(student, "torch", device="cpu", channels_last=False)):
        got = backend(real_images)
        assert got.shape == (len(real_images), 448) and got.dtype == np.float32
        max_abs, min_cos = agree(got, ref)
        assert max_abs <= MAX_ABS and min_cos >= MIN_COS, (backend, max_abs, min_cos)
    assert onnx_backend.providers == ["CPUExecutionProvider"]


def test_batches_larger_than_the_buffer_and_single_frames_agree(onnx_backend, real_images):
    together = onnx_backend(real_images)  # 8 images through a 4-image buffer
    singles = np.concatenate([onnx_backend([im]) for im in real_images])
    assert agree(together, singles)[0] <= 1e-5


def test_buffers_are_reused_and_results_never_alias_them(student, real_images):
    backend = make_backend(student, "torch", device="cpu", max_batch=4)
    first = backend(real_images[:2])
    keep = first.copy()
    buf = backend._buffers
    ptr = buf.tensor.data_ptr()
    second = backend(real_images[2:5])
    assert backend._buffers is buf and buf.tensor.data_ptr() == ptr
    assert np.array_equal(first, keep) and not np.shares_memory(first, second)


def test_export_cache_is_reused_and_keyed_by_weights_and_size(student, onnx_backend, cache_dir):
    path = onnx_backend.path
    assert path.parent == cache_dir and path.is_file() and "240x320" in path.name
    stamp = path.stat().st_mtime_ns
    again = make_backend(student, "onnx", device="cpu", cache_dir=cache_dir)
    assert again.path == path and not again.exported and path.stat().st_mtime_ns == stamp
    smaller = create_model("structvpr_mobilenetv2", preprocess=Preprocess(input_size=(64, 96)))
    smaller.load_state_dict(student.state_dict())
    assert model_hash(smaller) != model_hash(student)  # the preprocessing is part of the key
    assert onnx_cache_path(smaller, cache_dir) != path
    other = create_model("structvpr_mobilenetv2")  # other weights, same size
    assert onnx_cache_path(other, cache_dir) != path
    # channels_last / device moves do not change the key
    assert model_hash(copy.deepcopy(student).to(memory_format=torch.channels_last)) == model_hash(student)


def test_damaged_cache_file_is_exported_again(tmp_path, real_images):
    torch.manual_seed(1)
    model = create_model("structvpr_mobilenetv2", preprocess=Preprocess(input_size=(64, 96))).eval()
    path = onnx_cache_path(model, tmp_path)
    path.write_bytes(b"not an onnx file")
    backend = make_backend(model, "onnx", device="cpu", cache_dir=tmp_path)
    assert backend.exported and backend.path == path
    assert agree(backend(real_images[:3]), reference(model, real_images[:3]))[0] <= MAX_ABS


def test_native_size_model_exports_dynamic_height_and_width(tmp_path, real_images):
    torch.manual_seed(2)
    model = create_model("structvpr_mobilenetv2", preprocess=Preprocess(input_size=None)).eval()
    ex_onnx = DescriptorExtractor(model, device="cpu", backend="onnx", cache_dir=tmp_path, batch_size=4)
    ex_torch = DescriptorExtractor(model, device="cpu", batch_size=4)
    assert "dynamic" in ex_onnx.backend.path.name
    images = [im[:96, :128] for im in real_images[:3]] + [im[:64, :160] for im in real_images[3:6]]
    max_abs, min_cos = agree(ex_onnx(images), ex_torch(images))
    assert max_abs <= MAX_ABS and min_cos >= MIN_COS


def test_extractor_keeps_its_api_with_a_backend(student, onnx_backend, real_images):
    ex = DescriptorExtractor(student, device="cpu", backend=onnx_backend, batch_size=3)
    assert ex.backend is onnx_backend and ex.dim == 448 and ex.model is student
    assert ex.device == torch.device("cpu") and ex.preprocess == student.preprocess
    default = DescriptorExtractor(student, device="cpu", batch_size=3)
    assert isinstance(default.backend, TorchBackend) and default.backend.channels_last
    assert agree(ex(real_images), default(real_images))[0] <= MAX_ABS


def test_concurrent_calls_share_one_backend_safely(onnx_backend, real_images):
    expected = [onnx_backend([im]) for im in real_images]
    results: dict[int, list[np.ndarray]] = {}

    def worker(t: int) -> None:
        results[t] = [onnx_backend([im]) for im in real_images]

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results.values():
        assert all(np.allclose(g, e, atol=1e-6) for g, e in zip(got, expected, strict=True))


def test_bad_names_and_impossible_settings_raise_model_error(student):
    with pytest.raises(ModelError, match="unknown inference backend 'tensorrt'"):
        make_backend(student, "tensorrt")
    with pytest.raises(ModelError, match="unknown inference backend"):
        DescriptorExtractor(student, device="cpu", backend="Torch")
    with pytest.raises(ModelError, match="unknown precision 'int4'"):
        make_backend(student, "torch", device="cpu", precision="int4")
    with pytest.raises(ModelError, match="int8 runs on backend 'onnx'"):
        make_backend(student, "torch", device="cpu", precision="int8")
    with pytest.raises(ModelError, match="no option"):
        make_backend(student, "torch", device="cpu", spin=True)
    with pytest.raises(ModelError, match="fp16 needs a CUDA device"):
        make_backend(student, "torch", device="cpu", precision="fp16")
    with pytest.raises(ModelError, match="fp16 needs a CUDA device"):
        make_backend(student, "onnx", device="cpu", precision="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            make_backend(student, "torch", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_on_cuda_agrees_with_fp32(student, real_images):  # pragma: no cover - GPU machines only
    ref = reference(student, real_images)
    half = make_backend(student, "torch", device="cuda", precision="fp16")
    max_abs, min_cos = agree(half(real_images), ref)
    assert min_cos >= 0.999 and max_abs <= 1e-2
    assert next(student.parameters()).dtype == torch.float32  # the caller's model is untouched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_backend_leaves_the_callers_cpu_model_usable(student, real_images):  # pragma: no cover
    cuda = make_backend(student, "torch", device="cuda")
    assert next(student.parameters()).device.type == "cpu"  # moved a copy, not the caller's model
    max_abs, min_cos = agree(cuda(real_images), reference(student, real_images))
    assert min_cos >= 0.9999 and max_abs <= 1e-3
    on_gpu = copy.deepcopy(student).to("cuda:0")  # a model already there (a trainer's) is used, not copied
    assert make_backend(on_gpu, "torch", device="cuda").model is on_gpu


def test_backend_is_an_inference_backend_and_describes_itself(onnx_backend):
    assert isinstance(onnx_backend, InferenceBackend)
    info = onnx_backend.describe()
    assert info["kind"] == "onnx" and info["threads"] >= 1 and info["onnx"].endswith(".onnx")


@pytest.mark.parametrize("channels_last", [False, True])
def test_buffered_preprocessing_equals_to_tensor_batch(real_images, channels_last):
    model = create_model("structvpr_mobilenetv2", preprocess=Preprocess(input_size=(48, 80))).eval()
    backend = make_backend(model, "torch", device="cpu", channels_last=channels_last, max_batch=8)
    x = backend._buffers_for(len(real_images), (48, 80)).fill(real_images)
    assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.allclose(x, to_tensor_batch(real_images, model.preprocess), atol=1e-5)
