#!/usr/bin/env bash
# Every GPU measurement of the kernels, in four parts (each can run alone), in this order:
#   sweeps    a 2-minute smoke run of the Mosaic GPU matmul (tiny shapes), then the Pallas-vs-XLA kernel sweep
#             for both Pallas lowerings (Mosaic GPU, Triton; XLA timed once per shape; each shape's output also
#             checked against XLA's), then the lowering verdict: OUT/measured_tuning.json, which `auto` loads in
#             `steps`
#   autotune  (only when named) benchmarks/autotune_mosaic.py: Mosaic GPU tile configurations per op and shape
#             class, the winners merged into OUT/measured_tuning.json (15 candidates x 5 problems)
#   roofline  the ViT-B/16 train-step kernels, XLA and Pallas measured, per lowering (ResNet-50's are the sweep's
#             conv rows; GPU_SUITE_ROOFLINE_MODELS="resnet50 vit_b16" adds its roofline table), then
#             benchmarks/mosaic_targets.py: the Mosaic GPU issue's targets, measured against their goals
#   tests     the kernel tests on the GPU (TF32-aware f32 tolerances; the Mosaic GPU tests run the real kernels)
#   steps     the ResNet-50 and ViT-B/16 train-step benches, model.backend xla, pallas and auto (with
#             OUT/measured_tuning.json when there), plus pallas on Triton only
# Every result goes to OUT (JSON + the printed tables in *.txt, OUT/times.txt the seconds each step took); copy
# the figures into BENCHMARKS.md with the date, GPU and jax version.
#
#   bash benchmarks/gpu_suite.sh [OUT] [--only PARTS] [--tar FILE] [--dry-run]
#
# --only: comma list of the parts above (default: all but autotune; they run in the order above). --tar: pack OUT
# into FILE at the end. Each step is stopped after GPU_SUITE_STEP_LIMIT seconds (default 420; the sweep
# GPU_SUITE_SWEEP_LIMIT, 540), and none starts once the run has used GPU_SUITE_DEADLINE seconds (default: none),
# so that a run fits a command time limit and still packs (the verdict and the targets, a few seconds each, run
# regardless).
#
# On the lent GPU machine (10 minutes a command, 30 a session, 8 files back) run it in calls, each carrying
# device-wheels/ (made here first with benchmarks/device_wheels.sh: the 5 wheels that machine lacks), as
#   GPU_SUITE_DEADLINE=540 bash benchmarks/gpu_suite.sh gpu-suite-out --only PARTS --tar $OUT/PARTS.tgz
# with PARTS = sweeps (77 shapes x XLA + 2 lowerings), then roofline,tests (2 x 17 pairs, 160 tests), then steps (4
# train-step benches), then whatever OUT/failed.txt names as skipped (and, with time left, autotune,steps). Each
# call starts from what is carried: after each, unpack its tar here (`tar xzf FILES_AT/PARTS.tgz`, into
# ./gpu-suite-out, ignored by git) and carry gpu-suite-out too, so the targets see the first call's sweeps and
# the step benches' `auto` loads its measured_tuning.json.
# A step past its limit leaves what it measured: kernel runs save their JSON after every row.
#
# For a GPU machine with jax (CUDA) preinstalled and no package index: wheels it lacks are installed from
# ./device-wheels when present (jax is never reinstalled; pytest comes with that machine's image), and the project
# is imported from this checkout (PYTHONPATH), not pip-installed. Checked on CPU in a Python 3.12 venv holding
# only that image's packages (jax 0.11.2): the install and the kernel tests (160 passed).
# --dry-run (any machine): prints every step and runs the CPU-possible ones: the kernel tests (interpret
# mode), the predicted roofline columns, and the sweep and model benches at tiny sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
out=gpu-suite-out
dry=0
parts=sweeps,roofline,tests,steps
tar_file=
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --only) parts=${2:?--only needs a comma list of sweeps,autotune,roofline,tests,steps}; shift ;;
    --tar) tar_file=${2:?--tar needs a file}; shift ;;
    -*) echo "gpu_suite.sh: unknown option $1 (use [OUT] [--only PARTS] [--tar FILE] [--dry-run])" >&2; exit 2 ;;
    *) out=$1 ;;
  esac
  shift
done
for part in ${parts//,/ }; do
  case "$part" in
    sweeps|autotune|roofline|tests|steps) ;;
    *) echo "gpu_suite.sh: unknown part '$part' in --only (expected sweeps, autotune, roofline, tests or steps)" >&2
       exit 2 ;;
  esac
done
wants() { [[ ",$parts," == *",$1,"* ]]; }
mkdir -p "$out"
rm -f "$out/failed.txt"
py=${PYTHON:-$(command -v python || command -v python3)}
step_limit=${GPU_SUITE_STEP_LIMIT:-420}
deadline=${GPU_SUITE_DEADLINE:-0}

step() {  # step NAME CMD...: runs CMD, tee'd to OUT/NAME.txt; a failing step is reported, the suite goes on
  local name=$1; shift
  local limit=$step_limit start=$SECONDS
  if [ "$deadline" -gt 0 ]; then
    local left=$((deadline - SECONDS))
    if [ "$left" -lt 30 ]; then
      echo "SKIPPED: $name (GPU_SUITE_DEADLINE=$deadline s reached)" | tee -a "$out/failed.txt"
      return
    fi
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
  fi
  echo "== $name: $*" | tee "$out/$name.txt"
  if timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.txt"; then
    echo "ok" >>"$out/$name.txt"
  else
    echo "FAILED: $name (exit ${PIPESTATUS[0]}; 124: stopped after $limit s)" | tee -a "$out/failed.txt"
  fi
  echo "$name $((SECONDS - start))" >>"$out/times.txt"
}

if [ "$dry" = 0 ] && [ -d device-wheels ] && ! "$py" -c "import grain, ml_collections" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps device-wheels/*.whl
fi
# The project from this checkout, not installed: `pip install -e .` needs setuptools from an index to build (build
# isolation), which a machine without one cannot reach. Commands run from the repository root.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c "import jax; print('jax', jax.__version__, jax.devices())" | tee "$out/env.txt"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$out/env.txt"
fi

kernel_tests=(tests/test_matmul_kernel.py tests/test_conv2d_kernel.py tests/test_lowering.py tests/test_matmul_mgpu.py
  tests/test_conv_mgpu.py)
tiny=()
if [ "$dry" = 1 ]; then tiny=(--tiny --iters 1); fi
if wants sweeps; then
  if [ "$dry" = 1 ]; then  # the Mosaic interpreter takes ~10 s a kernel call, so only its matmul rows here
    step kernel_sweep_triton "$py" -m fastgpu_jax bench --kernels "${tiny[@]}" --lowering triton \
      --json "$out/kernel_sweep_triton.json"
    step kernel_sweep_mosaic "$py" -m fastgpu_jax bench --kernels "${tiny[@]}" --ops matmul --lowering mosaic \
      --json "$out/kernel_sweep_mosaic.json"
  else
    # The Mosaic GPU kernels' first run on a GPU: tiny matmuls, outputs checked, within 2 minutes. A kernel that
    # hangs there would hang the sweep to its limit, so then the sweep times Triton alone.
    step_limit=120 step smoke_mosaic "$py" -m fastgpu_jax bench --kernels --tiny --iters 3 --ops matmul \
      --lowering mosaic --json "$out/smoke_mosaic.json"
    lowerings=mosaic,triton
    if grep -q "FAILED: smoke_mosaic (exit 124" "$out/failed.txt" 2>/dev/null; then
      lowerings=triton
      echo "FAILED: the Mosaic GPU smoke run hung; the sweep times Triton only" | tee -a "$out/failed.txt"
    fi
    # One sweep, XLA timed once per shape for all lowerings; each row saved as timed, Mosaic's first.
    step_limit=${GPU_SUITE_SWEEP_LIMIT:-540} step kernel_sweeps "$py" -m fastgpu_jax bench --kernels \
      --lowering "$lowerings" --json "$out/kernel_sweep_{lowering}.json"
  fi
  # The two sweeps' verdict per (kernel, shape class): which lowering auto should take, and whether Pallas beats
  # XLA; saved as a tuning table that the step benches' auto loads (full-size sweeps only).
  if [ "$dry" = 0 ]; then
    deadline=0 step_limit=60 step lowering_verdict "$py" benchmarks/lowering_verdict.py \
      "$out/kernel_sweep_triton.json" "$out/kernel_sweep_mosaic.json" --write "$out/measured_tuning.json"
  fi
fi
if wants autotune; then
  if [ "$dry" = 1 ]; then
    echo "== (dry run) would run: $py benchmarks/autotune_mosaic.py --table $out/measured_tuning.json" \
      | tee -a "$out/autotune.txt"
  else
    step autotune "$py" benchmarks/autotune_mosaic.py --table "$out/measured_tuning.json"
  fi
fi
if wants roofline; then
  for low in mosaic triton; do
    for model in ${GPU_SUITE_ROOFLINE_MODELS:-vit_b16}; do
      step "roofline_${model}_$low" "$py" -m fastgpu_jax bench --kernels --model "$model" --lowering "$low" \
        --json "$out/roofline_${model}_$low.json"
    done
  done
  if [ "$dry" = 0 ]; then
    deadline=0 step_limit=60 step mosaic_targets "$py" benchmarks/mosaic_targets.py "$out"
  fi
fi
if wants tests; then
  if [ "$dry" = 1 ]; then
    step kernel_tests "$py" -m pytest -q -x "${kernel_tests[@]}" -k "lower or split or routes or layout"
  elif "$py" -c "import pytest" 2>/dev/null; then
    step kernel_tests "$py" -m pytest -q "${kernel_tests[@]}"
  else
    echo "FAILED: kernel_tests (pytest is not installed: carry pytest, pluggy and iniconfig wheels in" \
      "device-wheels/)" | tee -a "$out/failed.txt"
  fi
fi
if wants steps; then
  measured=()
  if [ -f "$out/measured_tuning.json" ]; then measured=("--config.model.pallas_tuning=$out/measured_tuning.json"); fi
  for cfg in imagenet_resnet50_synthetic imagenet_vit_b16_synthetic; do
    bench_step=("$py" -m fastgpu_jax bench --config "configs/$cfg.py" --steps 20)
    if [ "$dry" = 1 ]; then
      echo "== (dry run) would run: ${bench_step[*]} --backends xla,pallas,auto ${measured[*]}" \
        "--json $out/steps_$cfg.json" | tee -a "$out/steps.txt"
      continue
    fi
    step "steps_$cfg" "${bench_step[@]}" --backends xla,pallas,auto "${measured[@]}" --json "$out/steps_$cfg.json"
    step "steps_${cfg}_triton" "${bench_step[@]}" --backends pallas --config.model.pallas_lowering=triton \
      --json "$out/steps_${cfg}_triton.json"
  done
fi
echo "gpu_suite: results in $out/ (seconds per step in $out/times.txt)"
if [ -n "$tar_file" ]; then
  tar czf "$tar_file" -C "$(dirname "$out")" "$(basename "$out")"
  echo "gpu_suite: packed into $tar_file"
fi
if [ -f "$out/failed.txt" ]; then cat "$out/failed.txt"; exit 1; fi
