#!/usr/bin/env bash
# Shared launcher of the ImageNet table rows (scripts/cls_<arch>_<flops>.sh call it): the upstream README's ResNet-50
# CHEX recipe (8 x 128 images, lr 1.024, cosine, 250 epochs, AMP with static loss scale 128, mixup 0.2, label
# smoothing 0.1, delta_T 2, T_max 180) for one architecture, channel sparsity and delta0.
#
# Usage: scripts/cls_imagenet.sh ARCH SPARSITY DELTA0 RUN_NAME /data/imagenet [extra CLS/main.py flags]
#   NPROC=8 (GPUs per node). Multi-node: NNODES=2 NODE_RANK=0|1 RDZV=host:29500 on every node.
#   Outputs go to runs/RUN_NAME/ (override with --workspace); resume with --resume auto.
#   torchrun comes from PATH, else from $PYTHON -m torch.distributed.run (PYTHON default: python).
set -euo pipefail
ARCH=${1:?usage: $0 ARCH SPARSITY DELTA0 RUN_NAME /path/to/imagenet [extra flags]}
SPARSITY=${2:?missing SPARSITY}
DELTA0=${3:?missing DELTA0}
NAME=${4:?missing RUN_NAME}
DATA=${5:?usage: $0 ARCH SPARSITY DELTA0 RUN_NAME /path/to/imagenet [extra CLS/main.py flags]}
shift 5
NPROC=${NPROC:-8}
if [[ -n "${NNODES:-}" ]]; then
  LAUNCH=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --rdzv_backend c10d --rdzv_endpoint "${RDZV:?set RDZV=host:port}")
else
  LAUNCH=(--standalone)
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/launcher.sh"
exec "${TORCHRUN[@]}" "${LAUNCH[@]}" --nproc_per_node "$NPROC" "$ROOT/CLS/main.py" "$DATA" \
  --data-backend pytorch --raport-file raport.json -j8 -p 100 --lr 1.024 --optimizer-batch-size 1024 --warmup 8 \
  --arch "$ARCH" -c fanin --label-smoothing 0.1 --lr-schedule cosine --mom 0.875 --wd 3.0517578125e-05 -b 128 \
  --amp --static-loss-scale 128 --epochs 250 --mixup 0.2 \
  --grow_prune --delta_T 2 --T_max 180 --init_channel_ratio "$DELTA0" --channel_sparsity "$SPARSITY" \
  --workspace "$ROOT/runs/$NAME" "$@"
