#!/usr/bin/env bash
# The checks a CUDA machine runs that CI (CPU only) cannot. Usage: scripts/gpu_check.sh PART OUTDIR
#   bench  bench/gpu.py: torch fp32/fp16 on CUDA vs ONNX Runtime on 2 CPU threads, corridor R@1 per link
#   train  the general recipe on CUDA (1,024 dead-leaves images, 3 epochs, teacher = the packaged student)
#          and the same steps on 2 CPU threads of that machine; the CUDA-trained export checked on the CPU
#   tests  the test files with CUDA-only tests (test_backends.py, test_models.py)
# Needs VPR_ROS_SHARED (rtabmap_loop for bench/train; kitti, nordland, MobileNetV2 weights for tests).
set -euo pipefail
part=${1:?bench, train or tests}
out=${2:?output folder}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
log() { tr '\r' '\n' | grep --line-buffered -v -E '\| *[0-9]+/[0-9]+ \[' | tee "$out/$1"; }  # no progress bars
case $part in
  bench)
    $py bench/gpu.py 2>&1 | log gpu_bench.log
    cp bench/results.json "$out/results.json" ;;
  train)
    store=$(mktemp -d)
    recipe=(--config training/general_student.yaml --set data.store="$store" --set data.draws=2
            --set data.val_every=32 --set 'data.sources=[{kind: dead_leaves, count: 1024, size: [240, 320]}]'
            --set model.teacher=vpr_ros/weights/structvpr_mobilenetv2_general.pt --set schedule.val_every=62)
    $py -m vpr_ros.cli.main train "${recipe[@]}" --set schedule.epochs=3 --set run.device=cuda \
      --set run.dir="$store/gpu" --export "$store/gpu/exported.pt" 2>&1 | log train_gpu.log
    $py -m vpr_ros.cli.main train "${recipe[@]}" --threads 2 --set schedule.max_steps=12 --set run.device=cpu \
      --set run.dir="$store/cpu" 2>&1 | log train_cpu.log
    $py bench/gpu.py --weights "$store/gpu/exported.pt" --sizes 240x320 --batches 1 --repeats 3 --no-record \
      2>&1 | log exported_check.log ;;
  tests)
    $py -m pytest -q -p no:cacheprovider -rs test/test_backends.py test/test_models.py 2>&1 | log tests.log ;;
  *) echo "unknown part $part (bench, train or tests)" >&2; exit 2 ;;
esac
