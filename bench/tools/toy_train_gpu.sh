#!/usr/bin/env bash
# The whole toy recipe (world 2) on one GPU, for a session that is lent one: stage 1, then stage 2 with the
# sparse-direct-effects penalty, then an evaluation on 2,000 held-out scenes, writing both stages' weights, the
# training logs and eval.json into OUT (OUT/model2 is the one to ship).
#
#   bench/tools/toy_train_gpu.sh OUT [STEPS] [BATCH] [SPARSE_STEPS]    (defaults: 6000 steps of 512, then 600 of 128)
#   DEVICE=cpu WORKERS=2 bench/tools/toy_train_gpu.sh /tmp/t 4 16 2     (the tiny CPU rehearsal)
#
# Batches are drawn by WORKERS processes (default: all cores but two); batch k depends only on the seed and k,
# so the data is the same on any number of workers. Rendering (~1,000 images/s a core) bounds the speed.
set -euo pipefail
out=${1:?usage: bench/tools/toy_train_gpu.sh OUT [STEPS] [BATCH]}
steps=${2:-6000}
batch=${3:-512}
sparse_steps=${4:-600}
workers=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
device=${DEVICE:-cuda}
mkdir -p "$out"
python -m clipterm toy train "$out/model" --world 2 --steps "$steps" --batch-size "$batch" --lr "${LR:-2e-3}" \
  --warmup "${WARMUP:-200}" --seed 0 --workers "$workers" --device "$device" --eval-every "${EVAL_EVERY:-500}" \
  2>&1 | tee "$out/train.log"
python -m clipterm toy train "$out/model2" --from "$out/model" --steps "$sparse_steps" --batch-size 128 --lr 3e-4 \
  --warmup 50 --sparsity 0.03 --seed 0 --workers "$workers" --device "$device" --eval-every 150 2>&1 | tee "$out/train2.log"
python -m clipterm toy eval --model "local-dir:$out/model2" --n 2000 --json > "$out/eval.json"
cat "$out/eval.json"
