"""gpu_check: one command that checks the GPU paths of this project and measures its GPU ratios (budget: 7 minutes).

Why: every other number in this repository was measured on a 2-core CPU. This runs, on the first GPU available, what
the users' runs depend on and what the CPU could never exercise — fp16 autocast with GradScaler (static and dynamic
loss scale), cuDNN with channels_last, compact training with rebuilds, torch.compile (Inductor), DALI GPU decoding —
and reports each speed figure as a ratio to dense measured side by side in the same run:

  amp     the static- and dynamic-loss-scale paths: an injected fp16 overflow is skipped and counted, the scale
          stays (static) or halves (dynamic);
  detseg  a few SSD300 and Mask R-CNN iterations with AMP and one CHEX event each (finite losses, sane scaler);
  train   ResNet-50 training steps at 224 px, AMP + channels_last, at the largest batch ≤ 256 that fits: dense,
          masked CHEX (mask re-application share, one prune/regrow event), compact training at the densities of
          the S = 0.7 schedule → the whole 250-epoch recipe's cost relative to dense;
  infer   compact inference of the 3G/2G/1G/0.8G ResNet-50 widths (benchmarks/widths/, from CHEX training), batch 1
          and 256, fp16, channels_last, eager and torch.compile, each also with widths rounded to multiples of 8;
  dali    images/s of the pytorch, dali-cpu and dali-gpu CLS input pipelines on generated 500×375 JPEGs.

    python -m benchmarks.gpu_check                               # one GPU: writes benchmarks/results/gpu_<card>.{md,json}
    python -m benchmarks.gpu_check --device cpu --quick --out /tmp/gc   # the same code paths in seconds (CI)

Timing uses CUDA events, warm-up and medians (``benchmarks/gpu_check/common.py``). The exit status is 0 when every
check passed, 1 when one did not (the report says which), 2 for a usage error.
"""
from .cli import main

__all__ = ["main"]
