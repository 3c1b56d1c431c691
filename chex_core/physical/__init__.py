"""Physically compact CHEX training: the live model holds only the active channels.

Upstream CHEX trains the dense network and zeroes pruned channels with masks, so a 70 %-sparse run costs what dense
training costs. Here the training model is *narrowed* to the active (kept + regrown) channels, and the values of the
pruned channels live only in the explorer's MRU store, off the model.

How it works (:class:`PhysicalTraining`):

- ``mode="explore"`` (default): right after ``explorer.start()`` the model is narrowed. At every exploration event it is
  widened back to full size *in place* (live channels at their full-size positions, pruned slots zero — exactly the
  masked model), the unchanged :meth:`ChannelExplorer.explore` runs on it (CSS, MRU restore, regrowth, re-allocation,
  MRU store of the newly pruned channels), and the model is narrowed again to the new active channels. The algorithm
  stays in one place (``explorer.py``); this module only moves tensors.
- ``mode="frozen"``: masked training (``explorer.after_step``) until the last event, then the model is narrowed once
  and training continues on it. Fewer savings, but at most one shape change (the cheap option with ``torch.compile``).

Resizing keeps the *module objects* (the explorer, module hooks and module names stay valid) and swaps their
parameters and buffers for new tensors (hooks registered on the old *parameters* do not carry over), so after every
resize:

- the optimizer is rebuilt (:func:`rebuild_optimizer`): the same class, the same ``param_groups`` hyper-parameters
  and group membership (e.g. the no-weight-decay BN group), state tensors shaped like their parameter (SGD momentum,
  Adam ``exp_avg``/``exp_avg_sq``) transplanted by channel index; regrown channels start from what the masked mode
  gives them too: zero momentum / first moment (masking zeroes a pruned channel's state, and its gradient is exactly
  zero while it is masked) and, for Adam-like second moments, the layer's mean
  (:func:`chex_core.masking.fill_regrown_second_moments`);
- the LR scheduler and ``TrainStep`` are re-pointed at the new optimizer (:func:`repoint_scheduler`, the one place
  that touches torch's private scheduler attributes);
- ``wrap`` is called again: DDP must be re-wrapped (:func:`ddp_wrapper`), since its reducer hooks and buckets
  belong to the old parameters (PyTorch #12603: no error, the ranks silently drift);
- a ``GradScaler`` needs nothing (its per-optimizer state is reset by ``update()``, before the rebuild).

Downsample groups (``--chex-prune-downsample``) cannot be narrowed (the shortcut adds into the full residual stream),
so they stay full width and are masked after every step, as in the masked mode. Residual groups (``--chex-residual``)
are narrowed like any other: every producer, norm and consumer of the stream (the classifier, a detection head) at
once. GroupNorm layers are rejected (their statistics span channel groups). For detection/segmentation, either build
the explorer on the whole network with groups found ``within`` its backbone (what the tasks do; needed when a
residual group's consumers lie outside the backbone), or build it on the backbone and pass the whole network as
``root``: the optimizer and ``wrap`` then cover the whole network.

With the same seed, compact and masked training follow the same trajectory up to float rounding (a narrower conv
sums fewer exact zeros; tests/test_physical.py compares the two across several events). Rounding-level
differences grow like any perturbation of the run: on badly conditioned toy settings (tiny ResNets at 1×1–2×2
spatial size, batch 8) a 1e-7 difference reaches 1e-3 within a few steps, exactly as two masked runs do when one is
perturbed by 1e-8, after which CSS may pick other channels.

``torch.compile``: every resize recompiles the forward once (:func:`configure_compile` sizes Dynamo's recompile limit
and makes an eager fallback an error). Compile through ``wrap`` (``lambda m: torch.compile(m)``, or
``torch.compile(DDP(m))`` when distributed) so each rebuild hands Dynamo the new module.

Checkpoints: :meth:`PhysicalTraining.state_dict` holds the width spec and the held channel indices (tensors and plain
containers); save the explorer state, the compact model ``state_dict`` and the optimizer next to it. On resume build
the dense model and its explorer, then :meth:`PhysicalTraining.load_state_dict` loads the explorer, narrows the model
by slicing and loads the model and optimizer states strictly.

The package is split by concern: :mod:`.surgery` (moving tensors between channel sets), :mod:`.optimizer` (optimizer
rebuild), :mod:`.scheduler` (LR-scheduler re-pointing), :mod:`.wrapping` (DDP / compile policy) and :mod:`.training`
(the orchestration). Which tensors a group lives in comes from :mod:`chex_core.layout`, as for the explorer.
"""
from .optimizer import rebuild_optimizer
from .scheduler import TESTED_TORCH, repoint_scheduler
from .surgery import channel_layout, expand_state_dict, full_index, remap_channels, resize_
from .training import MODES, PhysicalTraining
from .wrapping import configure_compile, ddp_wrapper

__all__ = ["PhysicalTraining", "channel_layout", "remap_channels", "resize_", "rebuild_optimizer",
           "repoint_scheduler", "ddp_wrapper", "configure_compile", "expand_state_dict", "MODES", "full_index",
           "TESTED_TORCH"]
