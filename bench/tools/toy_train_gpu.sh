#!/usr/bin/env bash
# The whole toy recipe (world 2) on one GPU, for a session that is lent one, writing the weights, the training
# logs and eval.json (2,000 held-out scenes) into OUT.
#
#   bench/tools/toy_train_gpu.sh OUT [STEPS] [BATCH] [SPARSE_STEPS]    (the toy ViT: 6000 steps of 512, then 600 of 128
#                                                                        with the sparse-direct-effects penalty; OUT/model2 ships)
#   ARCH=rn bench/tools/toy_train_gpu.sh OUT [STEPS] [BATCH]             (toy-rn: recipe 2 on world 2 with the small
#                                                                        ModifiedResNet, 2400 steps of 128 at lr 1e-3, warmup 100,
#                                                                        seed 0, as clipterm/toyworld/model_rn/training.json records;
#                                                                        no sparse stage: its penalty splits ViT heads; OUT/model ships)
#   DEVICE=cpu WORKERS=2 bench/tools/toy_train_gpu.sh /tmp/t 4 16 2     (the tiny CPU rehearsal)
#
# Batches are drawn by WORKERS processes (default: all cores but two); batch k depends only on the seed and k,
# so the data is the same on any number of workers. Rendering (~1,000 images/s a core) bounds the speed.
set -euo pipefail
out=${1:?usage: bench/tools/toy_train_gpu.sh OUT [STEPS] [BATCH]}
arch=${ARCH:-vit}
workers=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
device=${DEVICE:-cuda}
mkdir -p "$out"
if [ "$arch" = rn ]; then
  python -m clipterm toy train "$out/model" --arch rn --world 2 --steps "${2:-2400}" --batch-size "${3:-128}" \
    --lr "${LR:-1e-3}" --warmup "${WARMUP:-100}" --seed 0 --workers "$workers" --device "$device" \
    --eval-every "${EVAL_EVERY:-300}" 2>&1 | tee "$out/train.log"
  python -m clipterm toy eval --model "local-dir:$out/model" --n 2000 --json > "$out/eval.json"
  cat "$out/eval.json"
  exit 0
fi
steps=${2:-6000}
batch=${3:-512}
sparse_steps=${4:-600}
python -m clipterm toy train "$out/model" --world 2 --steps "$steps" --batch-size "$batch" --lr "${LR:-2e-3}" \
  --warmup "${WARMUP:-200}" --seed 0 --workers "$workers" --device "$device" --eval-every "${EVAL_EVERY:-500}" \
  2>&1 | tee "$out/train.log"
python -m clipterm toy train "$out/model2" --from "$out/model" --steps "$sparse_steps" --batch-size 128 --lr 3e-4 \
  --warmup 50 --sparsity 0.03 --seed 0 --workers "$workers" --device "$device" --eval-every 150 2>&1 | tee "$out/train2.log"
python -m clipterm toy eval --model "local-dir:$out/model2" --n 2000 --json > "$out/eval.json"
cat "$out/eval.json"
