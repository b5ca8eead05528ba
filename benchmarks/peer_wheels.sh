#!/usr/bin/env bash
# Download, on a machine with the package index, the peers' wheels that a GPU machine without
# network needs for `gpu_check.sh build-test OUT --wheels DIR`: TRL 1.16, Liger-Kernel 0.8.5,
# verl 0.9.1 and the pieces of their imports the GPU image lacks, for Python 3.12 on x86-64.
# (~5 MB. Ray, which verl's core_algos imports, is left out: ~70 MB; the verl contenders and
# tests then skip with a line saying so.)
#
#   bash benchmarks/peer_wheels.sh wheels      # then carry wheels/ (it is git-ignored)
set -euo pipefail
dir=${1:?usage: bash benchmarks/peer_wheels.sh DIR}
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any -d "$dir" \
  trl==1.16.0 liger-kernel==0.8.5 verl==0.9.1 datasets dill multiprocess \
  "tensordict>=0.8,<=0.10.0,!=0.9.0" omegaconf hydra-core codetiming
ls "$dir"
