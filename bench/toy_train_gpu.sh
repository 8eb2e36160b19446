#!/usr/bin/env bash
# The whole toy v2 recipe on one GPU, for a session that is lent one: train, then evaluate on 2,000 held-out
# scenes, writing the weights, the training log and eval.json into OUT.
#
#   bench/toy_train_gpu.sh OUT [STEPS] [BATCH]          (defaults: 6000 steps of 512 images)
#   DEVICE=cpu WORKERS=2 bench/toy_train_gpu.sh /tmp/t 4 16     (the tiny CPU rehearsal)
#
# Batches are drawn by WORKERS processes (default: all cores but two); batch k depends only on the seed and k,
# so the data is the same on any number of workers. Rendering (~1,000 images/s a core) bounds the speed.
set -euo pipefail
out=${1:?usage: bench/toy_train_gpu.sh OUT [STEPS] [BATCH]}
steps=${2:-6000}
batch=${3:-512}
workers=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
device=${DEVICE:-cuda}
mkdir -p "$out"
python -m clipterm toy train "$out/model" --world 2 --steps "$steps" --batch-size "$batch" --lr "${LR:-2e-3}" \
  --warmup "${WARMUP:-200}" --seed 0 --workers "$workers" --device "$device" --eval-every "${EVAL_EVERY:-500}" \
  2>&1 | tee "$out/train.log"
python -m clipterm toy eval --model "local-dir:$out/model" --n 2000 --json > "$out/eval.json"
cat "$out/eval.json"
