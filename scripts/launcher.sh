# Sourced by the launch scripts (SEG/scripts/*.sh, scripts/cls_imagenet.sh, scripts/slurm_multinode.sh): the Python
# that has torch, and torch's launcher.
#
#   PYTHON     interpreter with torch installed (default: python)
#   TORCHRUN   set here to `torchrun` when it is on PATH, else to `$PYTHON -m torch.distributed.run`: the same
#              launcher, for a virtual environment used without activating it (torch installed, but its torchrun
#              script not on PATH)
PYTHON="${PYTHON:-python}"
if command -v torchrun >/dev/null 2>&1; then
    TORCHRUN=(torchrun)
else
    TORCHRUN=("$PYTHON" -m torch.distributed.run)
fi
