#!/usr/bin/env bash
# Evaluate a Mask R-CNN checkpoint on COCO2014 val: bbox and segm AP/AP50/AP75/APs/APm/APl plus the backbone-body
# FLOPs reduction at 224x224 (the upstream table).
#
# Usage (from SEG/):  bash scripts/eval.sh [extra SEG.train flags...]
# The checkpoint is CKPT if set, else found in RESULTS: the released upstream file
# 'maskrcnn_37%flops_37.3apbox_34.5apmask.pth.tar' (copy it there), else model_final.pth, else the newest
# checkpoint_*.pth. Upstream (maskrcnn-benchmark) parameter names are mapped onto this model automatically.
#
#   DATA_DIR   COCO root with val2014/ and annotations/instances_val2014.json (default /datasets/coco2014)
#   RESULTS    folder searched for the checkpoint; eval_metrics.json is written here (default SEG/results)
#   CKPT       explicit checkpoint file (default: search RESULTS)
#   NGPU       processes to launch (default: number of CUDA devices; 1 on a CPU-only machine)
#   MIN_SIZE / MAX_SIZE  test resize limits in pixels (default 800 / 1333)
#   WORKERS    data-loading workers per process (default 2)
#   PYTHON     interpreter with torch (default python); torchrun comes from PATH, else from $PYTHON -m
set -euo pipefail

SEG_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO_DIR="$(dirname "$SEG_DIR")"
source "$REPO_DIR/scripts/launcher.sh"

CUDA_COUNT="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
DATA_DIR="${DATA_DIR:-/datasets/coco2014}"
RESULTS="${RESULTS:-$SEG_DIR/results}"
if [ "$CUDA_COUNT" -gt 0 ]; then NGPU="${NGPU:-$CUDA_COUNT}"; else NGPU="${NGPU:-1}"; fi
CKPT="${CKPT:-$RESULTS}"
MIN_SIZE="${MIN_SIZE:-800}"
MAX_SIZE="${MAX_SIZE:-1333}"
WORKERS="${WORKERS:-2}"

cd "$REPO_DIR"
exec "${TORCHRUN[@]}" --standalone --nproc_per_node "$NGPU" -m SEG.train --eval-only --weights "$CKPT" \
    --data-path "$DATA_DIR" --output-dir "$RESULTS" --min-size "$MIN_SIZE" --max-size "$MAX_SIZE" \
    --workers "$WORKERS" "$@"
