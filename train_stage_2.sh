#!/usr/bin/env bash
# Stage-2 training of the dual-head detector with the gradient-explosion fix
# (docs/GRADIENT_FIX_QUICKSTART.md): lr 3e-5, weight decay 0.005, DFL weight 0.5, gradient
# clip 0.5, on the built-in synthetic shapes. Extra arguments go to train.py and
# override these (e.g. `bash train_stage_2.sh --epochs 20` or `--data path/to/yolo_set`).
# Logs and checkpoints: checkpoints/stage2/ (training_debug.log, metrics.jsonl, last.pt, best.pt).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
bash scripts/ensure_env.sh
exec .venv/bin/python train.py \
  --lr 3e-5 \
  --weight_decay 0.005 \
  --dfl_weight 0.5 \
  --gradient_clip_norm 0.5 \
  --save_dir checkpoints/stage2 \
  "$@"
