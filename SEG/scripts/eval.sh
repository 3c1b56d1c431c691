#!/usr/bin/env bash
# Evaluate a Mask R-CNN checkpoint on COCO2014 minival (upstream's evaluation set) or val2014: bbox and segm
# AP/AP50/AP75/APs/APm/APl plus the backbone-body FLOPs reduction at 224x224 (the upstream table).
#
# Usage (from SEG/):  bash scripts/eval.sh [extra SEG.train flags...]
# The checkpoint is CKPT if set, else found in RESULTS: the released upstream file
# 'maskrcnn_37%flops_37.3apbox_34.5apmask.pth.tar' (copy it there), else model_final.pth, else the newest
# checkpoint_*.pth. Upstream (maskrcnn-benchmark) parameter names are mapped onto this model automatically.
#
#   DATA_DIR   COCO root with val2014/ and annotations/instances_minival2014.json (upstream's 5,000-image minival,
#              from coco_annotations_minival.tgz) or instances_val2014.json (default /datasets/coco2014)
#   YEAR       COCO release in the folder names: 2014 or 2017 (val2017 = minival) (default 2014)
#   EVAL_SPLIT auto | minival | val (default auto: minival when its file exists, else all of val2014, which contains
#              the released model's training images: a warning says so, and it is recorded in eval_metrics.json)
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

# the number of CUDA devices, asked of torch only when NGPU is not given (importing torch takes seconds)
if [ -z "${NGPU:-}" ]; then
    CUDA_COUNT="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
else
    CUDA_COUNT=0
fi
DATA_DIR="${DATA_DIR:-/datasets/coco2014}"
YEAR="${YEAR:-2014}"
EVAL_SPLIT="${EVAL_SPLIT:-auto}"
RESULTS="${RESULTS:-$SEG_DIR/results}"
if [ "$CUDA_COUNT" -gt 0 ]; then NGPU="${NGPU:-$CUDA_COUNT}"; else NGPU="${NGPU:-1}"; fi
CKPT="${CKPT:-$RESULTS}"
MIN_SIZE="${MIN_SIZE:-800}"
MAX_SIZE="${MAX_SIZE:-1333}"
WORKERS="${WORKERS:-2}"

FLAGS=(--eval-only --weights "$CKPT" --data-path "$DATA_DIR" --year "$YEAR" --eval-split "$EVAL_SPLIT"
       --output-dir "$RESULTS" --min-size "$MIN_SIZE" --max-size "$MAX_SIZE" --workers "$WORKERS")

cd "$REPO_DIR"
# A flag mistake is one line and exit status 2 here, before torchrun would wrap it in its own traceback.
"$PYTHON" -m SEG.train --check-args "${FLAGS[@]}" "$@"
exec "${TORCHRUN[@]}" --standalone --nproc_per_node "$NGPU" -m SEG.train "${FLAGS[@]}" "$@"
