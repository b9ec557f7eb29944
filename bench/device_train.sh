#!/usr/bin/env bash
# On the GPU machine (device tool): moonlet throughput, nmoe kernels vs composed PyTorch, on corpus shards
# prepared here into .gpu/data (carry .gpu and .whl; .whl holds the duckdb wheel the image lacks).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$(ls -d packages/*/src | tr '\n' ':') PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
STEPS=${STEPS:-60}
VARIANTS=${VARIANTS:-nmoe,pytorch}
python3 bench/train.py "${CONFIG:-configs/moonlet.toml}" --steps "$STEPS" --variants "$VARIANTS" --out "$OUT/train" \
  --set data.source=files --set data.input=../shared/corpus/docs.jsonl.gz --set data.data_dir=.gpu/data \
  --set data.name=corpus-32k --set data.tokenizer=.gpu/data/tok-32k.json --set data.tokenizer_vocab_size=32768 \
  --set data.max_docs=5000 --set data.val_tokens=262144 --set data.shard_tokens=100000000 "$@" 2>&1 | tee "$OUT/train.log"
