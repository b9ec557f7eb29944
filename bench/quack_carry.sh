#!/usr/bin/env bash
# On the GPU machine: stash the carried .quack1 or .quack2 (bench/quack_wheels.sh) in /tmp/quack-parts; once both are
# there, install quack into /tmp/quack-site, which bench/gpu.sh then puts on PYTHONPATH.
set -euo pipefail
mkdir -p /tmp/quack-parts
for d in .quack1 .quack2; do [ -d "$d" ] && cp "$d"/* /tmp/quack-parts/; done
cd /tmp/quack-parts
if [ -f libs.name ] && [ -f libs.part.aa ] && [ -f libs.part.ab ]; then
  cat libs.part.* > "$(cat libs.name)" && rm libs.part.* libs.name
fi
if ls nvidia_cutlass_dsl_libs_cu13-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/quack-site ./*.whl
  echo "quack installed in /tmp/quack-site"
else
  echo "stashed: $(ls | tr '\n' ' ')"
fi
