#!/usr/bin/env bash
# Train Mask R-CNN R-50-FPN (GroupNorm) on COCO2014 with CHEX exploring the backbone body (upstream SEG recipe).
#
# Usage (from SEG/):  bash scripts/train.sh [extra SEG.train flags...]
# Every default below can be overridden by an environment variable; extra flags are appended to the command
# (python -m SEG.train --help lists them all).
#
#   DATA_DIR      COCO root with train2014/ val2014/ annotations/   (default /datasets/coco2014)
#   YEAR          COCO release in the folder names: 2014 (upstream) or 2017 (default 2014)
#   EVAL_SPLIT    auto | minival | val: upstream trains on train2014 + valminusminival and evaluates on minival, using
#                 annotations/instances_{minival,valminusminival}2014.json; auto = that when the files exist, else
#                 train2014 / all of val2014 with a warning (default auto)
#   CONVENTIONS   upstream (maskrcnn-benchmark's anchors, box coding, proposal selection, BGR255 pixels) | torchvision
#                 | auto (default upstream)
#   WEIGHTS       start from this checkpoint's weights, e.g. the released file (default: none; a checkpoint in
#                 RESULTS to resume from wins)
#   RESULTS       checkpoints, logs, metrics; training resumes from here (default SEG/results)
#   NGPU          processes to launch (default: number of CUDA devices, 8 upstream; 1 on a CPU-only machine)
#   IMS_PER_BATCH images per iteration over all processes (default 32); must be divisible by NGPU
#   LR            base learning rate (default 0.04, for 32 images; not rescaled automatically)
#   MAX_ITER      iterations (default 270000)
#   STEPS         learning-rate decay iterations, space separated (default "210000 250000")
#   WARMUP_ITERS  linear warmup iterations (default 500)
#   SPARSITY      CHEX channel sparsity S (default 0.5)
#   DELTA0        CHEX initial regrow ratio delta0 (default 0.5: training starts dense)
#   DELTA_T       iterations between prune/regrow events (default 1000)
#   T_MAX         last event iteration (default 0 = 0.75 x MAX_ITER)
#   ALLOCATION    per-layer widths: uniform (released SEG) or global (paper's |gamma| ranking)  (default uniform)
#   CRITERION     CSS criterion: leverage (released) | qr | l1 (default leverage)
#   REGROW        random (released SEG) | importance (paper) (default random)
#   PRUNE_DOWNSAMPLE  1 = also mask the downsample convs, as the released SEG code does (default 1)
#   RESIDUAL      1 = also explore the body's residual stream (--chex-residual; the FPN laterals narrow with it);
#                 replaces PRUNE_DOWNSAMPLE, whose downsample convs become part of the residual groups (default 0)
#   GROW_PRUNE    1 = CHEX on, 0 = dense baseline (default 1)
#   NORM          backbone norm: gn (upstream) | bn | syncbn (default gn; compact export needs bn/syncbn)
#   AMP           1 = mixed precision (default 1 with CUDA, as upstream's float16; 0 on CPU)
#   MIN_SIZE / MAX_SIZE  resize limits in pixels (default 800 / 1333)
#   CKPT_PERIOD   iterations between checkpoints (default 2500)
#   WORKERS       data-loading workers per process (default 4)
#   PYTHON        interpreter with torch (default python); torchrun comes from PATH, else from $PYTHON -m
set -euo pipefail

SEG_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO_DIR="$(dirname "$SEG_DIR")"
source "$REPO_DIR/scripts/launcher.sh"

# the number of CUDA devices, asked of torch only when NGPU or AMP is not given (importing torch takes seconds)
if [ -z "${NGPU:-}" ] || [ -z "${AMP:-}" ]; then
    CUDA_COUNT="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
else
    CUDA_COUNT=0
fi
DATA_DIR="${DATA_DIR:-/datasets/coco2014}"
YEAR="${YEAR:-2014}"
EVAL_SPLIT="${EVAL_SPLIT:-auto}"
CONVENTIONS="${CONVENTIONS:-upstream}"
WEIGHTS="${WEIGHTS:-}"
RESULTS="${RESULTS:-$SEG_DIR/results}"
if [ "$CUDA_COUNT" -gt 0 ]; then NGPU="${NGPU:-$CUDA_COUNT}"; AMP="${AMP:-1}"; else NGPU="${NGPU:-1}"; AMP="${AMP:-0}"; fi
IMS_PER_BATCH="${IMS_PER_BATCH:-32}"
LR="${LR:-0.04}"
MAX_ITER="${MAX_ITER:-270000}"
STEPS="${STEPS:-210000 250000}"
WARMUP_ITERS="${WARMUP_ITERS:-500}"
SPARSITY="${SPARSITY:-0.5}"
DELTA0="${DELTA0:-0.5}"
DELTA_T="${DELTA_T:-1000}"
T_MAX="${T_MAX:-0}"
ALLOCATION="${ALLOCATION:-uniform}"
CRITERION="${CRITERION:-leverage}"
REGROW="${REGROW:-random}"
PRUNE_DOWNSAMPLE="${PRUNE_DOWNSAMPLE:-1}"
RESIDUAL="${RESIDUAL:-0}"
GROW_PRUNE="${GROW_PRUNE:-1}"
NORM="${NORM:-gn}"
MIN_SIZE="${MIN_SIZE:-800}"
MAX_SIZE="${MAX_SIZE:-1333}"
CKPT_PERIOD="${CKPT_PERIOD:-2500}"
WORKERS="${WORKERS:-4}"

if [ $((IMS_PER_BATCH % NGPU)) -ne 0 ]; then
    echo "train.sh: IMS_PER_BATCH ($IMS_PER_BATCH) must be divisible by NGPU ($NGPU)" >&2
    exit 2
fi

FLAGS=(--data-path "$DATA_DIR" --year "$YEAR" --eval-split "$EVAL_SPLIT" --conventions "$CONVENTIONS"
       --output-dir "$RESULTS" --batch-size $((IMS_PER_BATCH / NGPU)) --lr "$LR"
       --max-iter "$MAX_ITER" --steps $STEPS --warmup-iters "$WARMUP_ITERS" --norm "$NORM"
       --min-size "$MIN_SIZE" --max-size "$MAX_SIZE" --checkpoint-period "$CKPT_PERIOD" --workers "$WORKERS"
       --channel_sparsity "$SPARSITY" --init_channel_ratio "$DELTA0" --delta_T "$DELTA_T" --T_max "$T_MAX"
       --chex-allocation "$ALLOCATION" --chex-criterion "$CRITERION" --chex-regrow "$REGROW")
[ "$GROW_PRUNE" = 1 ] && FLAGS+=(--grow_prune)
if [ "$RESIDUAL" = 1 ]; then
    FLAGS+=(--chex-residual)
elif [ "$PRUNE_DOWNSAMPLE" = 1 ]; then
    FLAGS+=(--chex-prune-downsample)
fi
[ "$AMP" = 1 ] && FLAGS+=(--amp)
[ -n "$WEIGHTS" ] && FLAGS+=(--weights "$WEIGHTS")

cd "$REPO_DIR"
# A flag mistake is one line and exit status 2 here, before torchrun would wrap it in its own traceback.
"$PYTHON" -m SEG.train --check-args "${FLAGS[@]}" "$@"
mkdir -p "$RESULTS"
exec "${TORCHRUN[@]}" --standalone --nproc_per_node "$NGPU" -m SEG.train "${FLAGS[@]}" "$@"
