#!/usr/bin/env bash
# Downloads, on a machine with a package index, the wheels a lent GPU machine lacks into ./device-wheels (ignored
# by git; name it in the device run's carry). That machine's image (Python 3.12, jax with CUDA) already has
# flax, optax, chex, orbax, numpy, absl, etils, cloudpickle, protobuf, pyyaml, tqdm, matplotlib, scikit-learn,
# pillow, safetensors and pytest; this adds only what it lacks, so nothing of its own is replaced.
# benchmarks/gpu_suite.sh installs them there (pip --no-index --no-deps) when grain or ml_collections is missing.
#
#   bash benchmarks/device_wheels.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-device-wheels}
rm -rf "$out"
mkdir -p "$out"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_28_x86_64 -d "$out" \
  grain==0.2.18 array_record==0.8.6 ml_collections==1.1.0 tensorboardX==2.6.5 portpicker==1.6.0
ls "$out"
du -sh "$out"
