#!/usr/bin/env bash
# One GPU-machine call (device tool), by stages: bash bench/gpu.sh STAGE [STAGE ...]
# Carry .whl (duckdb, nvshmem4py; ../shared/device/wheels.sh; WHEELS=DIR installs another folder's wheels) and, for training stages, .gpu (prepared data:
# `uv run nmoe-data prep --source files --input ../shared/corpus/docs.jsonl.gz --output .gpu/data
#  --name corpus-32k --tokenizer .gpu/data/tok-32k.json --tokenizer-vocab-size 32768 --val-tokens 262144
#  --shard-tokens 100000000 --max-docs 7000`, then MAX_DOCS=7000 here: 6.4M train tokens, 15 MB, enough for the
#  300-step precision study; the whole corpus (28 MB) no longer fits beside the wheels in the 64 MiB carry).
# Optional quack (the routed fp8 layer's gathering GEMMs): bench/quack_wheels.sh here, then bench/quack_carry.sh in two
# calls carrying .quack1 and .quack2; later calls to the same warm machine find it in /tmp/quack-site.
# Every stage logs to $OUT/<stage>.log; the summary of each stage is printed last. precision runs eager unless COMPILE=true.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-.whl}/*.whl \
  >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$(ls -d packages/*/src | paste -sd:) PYTHONUNBUFFERED=1
if [ -d /tmp/quack-site ]; then  # optional quack, installed by bench/quack_carry.sh
  export PYTHONPATH=/tmp/quack-site:/tmp/quack-site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TRITON_CACHE_DIR=$PWD/.gpu/triton-cache TORCHINDUCTOR_CACHE_DIR=$PWD/.gpu/inductor-cache
OUT=${OUT:-/tmp/out}
DATA=(--set data.source=files --set data.input=../shared/corpus/docs.jsonl.gz --set data.data_dir=.gpu/data --set data.name=corpus-32k
      --set data.tokenizer=.gpu/data/tok-32k.json --set data.shard_tokens=100000000 --set data.val_tokens=262144
      --set data.max_docs=${MAX_DOCS:-} --set data.verify_shards=false)
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"

stage() {  # stage NAME TIMEOUT_S COMMAND...: run, log, keep the last lines for the summary
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  { echo "== $name: exit $rc in $((SECONDS - t0)) s"; tail -n "${TAIL:-14}" "$OUT/$name.log"; } >>"$SUMMARY"
}

for s in "$@"; do
  case $s in
    env) stage env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total --format=csv; python3 -c "
import torch, triton, duckdb, nvshmem.core; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
import nmoe.train.loop, nmoe.rdep, nmoe.kernels; print(\"imports ok\")"' ;;
    kernels-check) stage kernels-check 480 python3 packages/nmoe-kernels/tests/gpu_check.py ;;
    lowprec-check) stage lowprec-check 560 python3 packages/nmoe-kernels/tests/gpu_lowprec.py --out "$OUT" ${CHECK_ARGS:-} ;;
    rdep-multi) for n in 1 2 4; do
        TAIL=7 stage "rdep-multi-$n" 240 python3 -m torch.distributed.run --standalone --nproc_per_node=$n \
          packages/nmoe-rdep/tests/gpu_multi.py; done ;;
    model-use) tar xJf .gpu/core.tar.xz -C .gpu && stage model-use 320 python3 \
        packages/nmoe-train/tests/gpu_check_model_use.py --config configs/moonlet.toml --bundle .gpu/core --max-per-task 50 ;;
    determinism|determinism-strict) TAIL=8 stage "$s" 300 python3 packages/nmoe-train/tests/gpu_check_determinism.py \
        --layers "${LAYERS:-2}" $([ "$s" = determinism-strict ] && echo --deterministic) ;;
    kernels-bench) stage kernels-bench 420 python3 bench/kernels.py --out "$OUT/kernels.json" ;;
    lowprec-bench) stage lowprec-bench 300 python3 bench/lowprec.py --out "$OUT/lowprec.json" ${LOWPREC_ARGS:-} ;;
    fp8-profile) TAIL=60 stage fp8-profile 420 python3 bench/fp8_profile.py --out "$OUT/fp8_profile.json" ${FP8_ARGS:-} ;;
    rdep-local) stage rdep-local 240 python3 bench/rdep_local.py --out "$OUT/rdep_local.json" ;;
    train-moonlet) TAIL=22 stage train-moonlet 560 python3 bench/train.py configs/moonlet.toml --steps "${STEPS:-40}" \
        --variants "${VARIANTS:-nmoe,tma}" ${PROFILE---profile} --out "$OUT/train" "${DATA[@]}" ${EXTRA:-} ;;
    ep-one-gpu) TAIL=16 stage ep-one-gpu 540 python3 bench/ep_one_gpu.py configs/moonlet.toml --out "$OUT/ep" "${DATA[@]}" \
        --set model.n_layers=4 --set train.steps=20 --set train.global_batch_size=4 --set optim.warmup=5 \
        --set optim.warmdown=5 --set eval.eval_every=0 --set train.log_every=5 --set runtime.compile=false ;;
    precision) TAIL=12 stage precision 560 python3 bench/precision.py configs/moonlet.toml --out "$OUT/precision" \
        --steps "${STEPS:-300}" ${PVARIANTS:+--variants "$PVARIANTS"} "${DATA[@]}" --set model.n_layers=6 --set train.global_batch_size=8 \
        --set runtime.compile=${COMPILE:-false} --set optim.warmup=30 --set optim.warmdown=60 --set eval.eval_every=100 \
        --set eval.eval_batches=8 --set train.log_every=25 ;;
    learning) for seed in ${SEEDS:-0}; do  # SEEDS="1 2": one run per seed (model init and data order)
        TAIL=16 stage "learning-s$seed" 590 python3 bench/learning.py --data .gpu/data/corpus-32k \
        --out "$OUT/learning-s$seed" --seed "$seed" \
        --variants "${VARIANTS:-nmoe,torchtitan,nmoe-tt-init,muon,head,embed,out_proj}" ${CUSTOM:---custom \
        muon-tt-init:init_scheme=torchtitan,optimizer=muon} --max-minutes "${MINUTES:-9}" \
        --steps "${STEPS:-300}" --batch "${BATCH:-12}"; done ;;
    peer) TAIL=12 stage peer "$((${MINUTES:-5} * 60 + 30))" python3 bench/peer.py --out "$OUT/peer" \
        --shapes "${SHAPES:-configs/moonlet.toml@12x2048,configs/moonlet.toml@8x2048}" --max-minutes "${MINUTES:-5}" ;;
    super) tar xJf .gpu/core.tar.xz -C .gpu && TAIL=40 stage super 540 python3 -m nmoe.train configs/speedrun/super.toml \
        "${DATA[@]}" --set train.steps="${STEPS:-300}" --set optim.warmup=50 --set optim.warmdown=100 \
        --set eval.eval_every=100 --set eval.core_bundle=.gpu/core --set eval.core_max_per_task="${CORE_N:-100}" \
        --set eval.leaderboard="$OUT/LEADERBOARD.json" --set checkpoint.dir="$OUT/ckpt" --set metrics.dir="$OUT/metrics" \
        --set metrics.experiments_db="$OUT/runs.sqlite" --set runtime.progress=false --set train.log_every=50 ;;
    *) echo "unknown stage $s" >>"$SUMMARY" ;;
  esac
done
cat "$SUMMARY"
