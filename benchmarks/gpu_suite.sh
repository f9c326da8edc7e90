#!/usr/bin/env bash
# One GPU run does it all: the kernel tests on the GPU (TF32-aware f32 tolerances; the Mosaic GPU matmul tests run
# the real kernel there), the roofline of the ResNet-50 and ViT-B/16 train-step kernels with XLA and Pallas
# measured, the Pallas-vs-XLA kernel sweep, each for both Pallas lowerings (Triton, Mosaic GPU: the matmul and
# the implicit-GEMM conv), and the ResNet-50 and ViT-B/16 train-step benches for
# model.backend xla, pallas and auto (lowering auto) plus pallas on Triton only. Every result goes to
# OUT (JSON + the printed tables in *.txt); copy the figures into BENCHMARKS.md with the date, GPU and jax.
#
#   bash benchmarks/gpu_suite.sh [OUT] [--dry-run]
#
# For a GPU machine with jax (CUDA) preinstalled and no package index: wheels it lacks are installed from
# ./device-wheels when present (made beforehand with the shared device-wheels.sh, plus pytest, pluggy and
# iniconfig for the kernel tests; jax is never reinstalled).
# --dry-run (any machine): prints every step and runs the CPU-possible ones: the kernel tests (interpret
# mode), the predicted roofline columns, and the sweep and model benches at tiny sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
out=gpu-suite-out
dry=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    -*) echo "gpu_suite.sh: unknown option $arg (use [OUT] [--dry-run])" >&2; exit 2 ;;
    *) out=$arg ;;
  esac
done
mkdir -p "$out"
py=${PYTHON:-python}

step() {  # step NAME CMD...: runs CMD, tee'd to OUT/NAME.txt; a failing step is reported, the suite goes on
  local name=$1; shift
  echo "== $name: $*" | tee "$out/$name.txt"
  if "$@" 2>&1 | tee -a "$out/$name.txt"; then
    echo "ok" >>"$out/$name.txt"
  else
    echo "FAILED: $name" | tee -a "$out/failed.txt"
  fi
}

if [ "$dry" = 0 ] && ! "$py" -c "import grain, ml_collections, fastgpu_jax" 2>/dev/null; then
  if [ -d device-wheels ]; then
    "$py" -m pip install -q --no-index --no-deps device-wheels/*.whl
  fi
  "$py" -m pip install -q --no-deps -e .
fi
"$py" -c "import jax; print('jax', jax.__version__, jax.devices())" | tee "$out/env.txt"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$out/env.txt"
fi

if [ "$dry" = 1 ]; then
  tiny=(--tiny --iters 1)
  step kernel_tests "$py" -m pytest -q -x tests/test_matmul_kernel.py tests/test_conv2d_kernel.py \
    tests/test_lowering.py tests/test_matmul_mgpu.py tests/test_conv_mgpu.py -k "lower or split or routes or layout"
elif "$py" -c "import pytest" 2>/dev/null; then
  tiny=()
  step kernel_tests "$py" -m pytest -q tests/test_matmul_kernel.py tests/test_conv2d_kernel.py \
    tests/test_lowering.py tests/test_matmul_mgpu.py tests/test_conv_mgpu.py
else
  tiny=()
  echo "FAILED: kernel_tests (pytest is not installed: carry pytest, pluggy and iniconfig wheels in" \
    "device-wheels/)" | tee -a "$out/failed.txt"
fi
for low in triton mosaic; do
  for model in resnet50 vit_b16; do
    step "roofline_${model}_$low" "$py" -m fastgpu_jax bench --kernels --model "$model" --lowering "$low" \
      --json "$out/roofline_${model}_$low.json"
  done
  ops=()  # dry run: the Mosaic interpreter takes ~10 s a kernel call, so only its matmul rows there
  if [ "$dry" = 1 ] && [ "$low" = mosaic ]; then ops=(--ops matmul); fi
  step "kernel_sweep_$low" "$py" -m fastgpu_jax bench --kernels "${tiny[@]}" "${ops[@]}" --lowering "$low" \
    --json "$out/kernel_sweep_$low.json"
done
if [ "$dry" = 1 ]; then
  echo "== (dry run) the lowering verdict (full-size sweeps only) and the train-step benches would run:" \
    | tee "$out/steps.txt"
  echo "$py benchmarks/lowering_verdict.py $out/kernel_sweep_triton.json $out/kernel_sweep_mosaic.json" \
    "--write $out/measured_tuning.json" | tee -a "$out/steps.txt"
  for cfg in imagenet_resnet50_synthetic imagenet_vit_b16_synthetic; do
    echo "$py -m fastgpu_jax bench --config configs/$cfg.py --backends xla,pallas,auto --steps 20" \
      "--config.model.pallas_tuning=$out/measured_tuning.json --json $out/steps_$cfg.json" | tee -a "$out/steps.txt"
    echo "$py -m fastgpu_jax bench --config configs/$cfg.py --backends pallas --steps 20" \
      "--config.model.pallas_lowering=triton --json $out/steps_${cfg}_triton.json" | tee -a "$out/steps.txt"
  done
else
  # The two sweeps' verdict per (kernel, shape class): which lowering auto should take, and whether Pallas
  # beats XLA; saved as a tuning table that the step benches' auto below loads.
  step lowering_verdict "$py" benchmarks/lowering_verdict.py "$out/kernel_sweep_triton.json" \
    "$out/kernel_sweep_mosaic.json" --write "$out/measured_tuning.json"
  measured=()
  if [ -f "$out/measured_tuning.json" ]; then measured=("--config.model.pallas_tuning=$out/measured_tuning.json"); fi
  for cfg in imagenet_resnet50_synthetic imagenet_vit_b16_synthetic; do
    step "steps_$cfg" "$py" -m fastgpu_jax bench --config "configs/$cfg.py" --backends xla,pallas,auto --steps 20 \
      "${measured[@]}" --json "$out/steps_$cfg.json"
    step "steps_${cfg}_triton" "$py" -m fastgpu_jax bench --config "configs/$cfg.py" --backends pallas --steps 20 \
      --config.model.pallas_lowering=triton --json "$out/steps_${cfg}_triton.json"
  done
fi
echo "gpu_suite: results in $out/"
if [ -f "$out/failed.txt" ]; then cat "$out/failed.txt"; exit 1; fi
