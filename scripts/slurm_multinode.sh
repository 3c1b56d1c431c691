#!/bin/bash
# Multi-node CHEX training on Slurm: one torchrun launcher per node, c10d rendezvous on the first node.
#
#   sbatch scripts/slurm_multinode.sh                       # default: the paper's ResNet-50 2-GFLOPs recipe (CLS)
#   sbatch --nodes 4 scripts/slurm_multinode.sh CLS/main.py /data/imagenet --arch resnet50 ...   # any entry point
#
# Every process gets RANK / LOCAL_RANK / WORLD_SIZE from torchrun (chex_core.distributed.init_distributed reads
# them). The rendezvous endpoint is the job's first node; all nodes must reach it on $MASTER_PORT (default 29500).
# Per-node GPU count: $GPUS_PER_NODE, else Slurm's $SLURM_GPUS_ON_NODE, else 8.
# Run from the repository root (sbatch keeps the submit directory), or set CHEX_ROOT. torchrun comes from PATH, else
# from $PYTHON -m torch.distributed.run (PYTHON default: python; see scripts/launcher.sh).
#
#SBATCH --job-name=chex
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=72:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

cd "${CHEX_ROOT:-${SLURM_SUBMIT_DIR:-.}}"
: "${SLURM_NNODES:?not inside a Slurm allocation (submit with sbatch, or run under salloc)}"
source scripts/launcher.sh

MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')   # awk reads all: no SIGPIPE under pipefail
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
# torchrun would default every worker to 1 thread; data loading and the CSS step on CPU want a few.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

if [ "$#" -eq 0 ]; then
    # upstream CLS recipe (README "ResNet-50, 2 GFLOPs"), 8 GPUs x nodes; the per-GPU batch stays 128
    set -- CLS/main.py /data/imagenet --data-backend pytorch --raport-file raport.json -j8 -p 100 \
        --lr 1.024 --optimizer-batch-size 1024 --warmup 8 --arch resnet50 -c fanin --label-smoothing 0.1 \
        --lr-schedule cosine --mom 0.875 --wd 3.0517578125e-05 -b 128 --amp --static-loss-scale 128 \
        --epochs 250 --mixup 0.2 --grow_prune --delta_T 2 --T_max 180 --init_channel_ratio 0.3 \
        --channel_sparsity 0.7 --workspace "logs/slurm-${SLURM_JOB_ID:-0}"
fi

echo "chex: ${SLURM_NNODES} node(s) x ${GPUS_PER_NODE} process(es), rendezvous ${MASTER}:${MASTER_PORT}" >&2
# srun starts one launcher per node (--ntasks-per-node=1); --kill-on-bad-exit ends the job when a node fails
# instead of leaving the others blocked in a collective.
srun --kill-on-bad-exit=1 "${TORCHRUN[@]}" \
    --nnodes "$SLURM_NNODES" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_id "${SLURM_JOB_ID:-chex}" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$MASTER:$MASTER_PORT" \
    "$@"
