#!/usr/bin/env bash
# Prepare quack (the optional CuTe DSL kernel of the routed fp8 layer's gathering GEMMs) for the GPU machine, which has
# no internet: Python 3.12 x86-64 wheels, split into .quack1 and .quack2 because the CUTLASS DSL runtime (88 MB) is
# over one call's 64 MiB carry. Run from the project root, then on a warm machine, one call right after the other:
#   carry [".quack1"]: bash bench/quack_carry.sh      carry [".quack2"]: bash bench/quack_carry.sh
# and from then on bench/gpu.sh puts /tmp/quack-site on PYTHONPATH (until the machine goes back).
set -euo pipefail
for d in .quack1 .quack2; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
rm -rf .quack1 .quack2 /tmp/quack-wheels && mkdir -p .quack1 .quack2 /tmp/quack-wheels
for p in quack-kernels==0.6.5 nvidia-cutlass-dsl==4.7.0 nvidia-cutlass-dsl-libs-base==4.7.0 \
  nvidia-cutlass-dsl-libs-core==4.7.0 nvidia-cutlass-dsl-libs-cu13==4.7.0 'apache-tvm-ffi>=0.1.15,<0.2' \
  torch-c-dlpack-ext einops nvidia-cuda-nvdisasm 'protobuf>=6.30.2,<7'; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d /tmp/quack-wheels "$p" 2>&1 | grep -v '^WARNING' || true
done
big=(/tmp/quack-wheels/nvidia_cutlass_dsl_libs_cu13-*.whl)
split -b 44000000 "${big[0]}" .quack1/libs.part.
mv .quack1/libs.part.a[b-z] .quack2/
find /tmp/quack-wheels -name '*.whl' ! -name 'nvidia_cutlass_dsl_libs_cu13-*' -exec cp {} .quack1/ \;
basename "${big[0]}" > .quack1/libs.name
mv .quack1/apache_tvm_ffi-*.whl .quack1/protobuf-*.whl .quack2/  # .quack1 stays well under the limit with the tree
du -sh .quack1 .quack2
