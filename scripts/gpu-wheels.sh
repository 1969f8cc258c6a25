#!/usr/bin/env bash
# Collect what benchmarks/gpu_check.py needs on a GPU machine that has torch, transformers, accelerate and peft
# but nothing else and no network: bitsandbytes (QLoRA), DeepSpeed (ZeRO-2/3) and DeepSpeed's small
# dependencies, for CPython 3.12 on x86-64 Linux, into one folder (about 46 MB; a device call carries 64 MiB).
# flash-attn is not collected: PyPI has only its source, which needs a CUDA toolchain and hours to build, so
# gpu_check skips the flash-attention rows and says why.
#   bash scripts/gpu-wheels.sh gpu-wheels   then, on the device:   python benchmarks/gpu_check.py --wheels gpu-wheels
set -euo pipefail
out=${1:-gpu-wheels}
python=${PYTHON:-python3}
mkdir -p "$out"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
"$python" -m pip download --quiet --no-deps --only-binary :all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$out" "bitsandbytes>=0.45,<1" "hjson>=3,<4" "ninja>=1.11,<2" "py-cpuinfo>=9,<10" \
    "msgpack>=1,<2"
"$python" -m pip download --quiet --no-deps --no-binary :all: -d "$out" "deepspeed>=0.16,<1"
du -sh "$out"
