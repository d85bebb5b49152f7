#!/usr/bin/env bash
# Regenerate the embedded upstream checkpoint pretraining/embedded/bit-tiny-glyphs from nothing:
# render the glyph dataset, pre-train bit-tiny on it with pretrain.py, install O/final here.
# Usage (from the repository root): bash pretraining/embedded/regenerate.sh [WORK_DIR]
# On 2 cores: one training thread plus one decoding worker (two intra-op threads on a busy 2-core
# machine spend their time waiting for each other).
set -euo pipefail
cd "$(dirname "$0")/../.."
work="${1:-runs/embedded}"
target=pretraining/embedded/bit-tiny-glyphs
start=$(date +%s)

python -m pretraining.synthetic --output-dir "$work/glyphs" --num-classes 256 --examples-per-class 200 --image-size 40
OMP_NUM_THREADS=1 python pretraining/pretrain.py \
  --model-preset bit-tiny --dataset "$work/glyphs" --output-dir "$work/run" \
  --max-steps 3000 --global-batch-size 128 --per-device-batch-size 128 --image-size 48 \
  --base-learning-rate 0.06 --warmup-steps 100 --decay-epochs 60 75 85 --crop-area-range 0.3 1 \
  --validation-examples 2000 --probe-every 500 --checkpoint-every 500 --logging-steps 50 \
  --dataloader-num-workers 1 --seed 0

rm -rf "$target" && cp -r "$work/run/final" "$target"
# The card's usage code loads the model by its folder name: write the card again under the shipped name.
python -c "import sys; from model_cards import write_model_card; write_model_card(sys.argv[1])" "$target"
echo "Regenerated $target in $(( $(date +%s) - start )) s"
