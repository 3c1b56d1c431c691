"""The shared exploration flags (spelled as upstream) and the one adapter from argparse to a ChannelExplorer.

Only this module of chex_core sees ``argparse``; every task entry point calls :func:`add_chex_args`, then
:func:`validate_chex_args` right after parsing, then :func:`explorer_from_args` once the model exists.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence

from torch import nn

from .allocate import ALLOCATIONS
from .budget import MacsModel, parse_flops, sparsity_for_macs
from .css import CRITERIA
from .explorer import ChannelExplorer
from .groups import ChannelGroup, resnet_groups
from .physical import MODES as COMPACT_MODES
from .regrow import REGROW_METHODS
from .schedule import ExplorationSchedule

__all__ = ["add_chex_args", "validate_chex_args", "groups_from_args", "explorer_from_args", "schedule_from_args"]

log = logging.getLogger(__name__)


def add_chex_args(parser: argparse.ArgumentParser, *, unit: str = "epochs", defaults: dict | None = None) -> None:
    """Add the CHEX flags. ``unit`` names what ``--delta_T``/``--T_max`` count (epochs or iterations)."""
    d = {"channel_sparsity": 0.2, "init_channel_ratio": 0.2, "delta_T": 2, "T_max": 250, "chex_criterion": "qr",
         "chex_regrow": "importance", "chex_allocation": "global", **(defaults or {})}
    g = parser.add_argument_group("CHEX channel exploration")
    g.add_argument("--grow_prune", action="store_true",
                   help="turn CHEX on: prune and regrow channels during training (default: dense training)")
    g.add_argument("--channel_sparsity", type=float, default=d["channel_sparsity"],
                   help="S: fraction of prunable channels removed in the final model, in [0, 1) "
                        f"(default {d['channel_sparsity']})")
    g.add_argument("--init_channel_ratio", type=float, default=d["init_channel_ratio"],
                   help="delta0: initial regrow fraction, in [0, S]; training starts with 1-S+delta0 of the "
                        f"prunable channels (default {d['init_channel_ratio']})")
    g.add_argument("--delta_T", type=int, default=d["delta_T"],
                   help=f"Delta T: {unit} between exploration events (default {d['delta_T']})")
    g.add_argument("--T_max", type=int, default=d["T_max"],
                   help=f"last {unit[:-1]} at which an event may happen; masks are frozen after it "
                        f"(default {d['T_max']})")
    g.add_argument("--chex-criterion", choices=CRITERIA, default=d["chex_criterion"],
                   help="intra-layer column-subset-selection criterion: qr = pivoted QR, leverage = SVD leverage "
                        f"scores (official CLS code), l1 = filter L1 norm (default {d['chex_criterion']})")
    g.add_argument("--chex-regrow", choices=REGROW_METHODS, default=d["chex_regrow"],
                   help="which pruned channels regrow: importance sampling by projection residual (paper) or "
                        f"uniformly at random (released DET/SEG code) (default {d['chex_regrow']})")
    g.add_argument("--chex-allocation", choices=ALLOCATIONS, default=d["chex_allocation"],
                   help="channel counts per layer: global |gamma| ranking (paper) or uniform (released SEG code) "
                        f"(default {d['chex_allocation']})")
    g.add_argument("--chex-min-channels", type=int, default=1,
                   help="minimum number of channels every pruned layer keeps (default 1)")
    g.add_argument("--chex-prune-downsample", action="store_true",
                   help="also mask the residual downsample convs, as the official ResNet-50 code does; a compact "
                        "model keeps them full width, so this only changes the zero-aware FLOPs count (cannot be "
                        "combined with --chex-residual, which narrows them as part of the residual stream)")
    g.add_argument("--chex-residual", action="store_true",
                   help="also explore the residual stream (beyond upstream): each stage's stem/downsample and "
                        "block-output convs form one coupled channel group, read by every block, the next stage "
                        "and the classifier or the task's head/neck; reaches far smaller FLOPs budgets and "
                        "narrows the compact model's whole stream (default: block-internal channels only, as "
                        "upstream)")
    g.add_argument("--target-flops", default=None, metavar="FLOPS",
                   help="budget by FLOPs instead of --channel_sparsity: e.g. 2G, 500M, 2e9, or a fraction of the "
                        "dense model such as 0.5 (paper convention: multiply-accumulates of one image). The channel "
                        "sparsity is chosen before training (a feasibility report is printed) and every event's "
                        "allocation cuts the global ranking where the final model meets the target")
    g.add_argument("--round-to", type=int, default=1, metavar="N",
                   help="keep every pruned layer's width a multiple of N (8 suits fp16 tensor cores; default 1 = "
                        "paper fidelity)")
    g.add_argument("--compact-training", action="store_true",
                   help="train physically small: the model holds only the active channels (pruned ones live in the "
                        "explorer's MRU store) and is rebuilt at every exploration event; same trajectory as masked "
                        "training, less compute per step. Needs --grow_prune")
    g.add_argument("--compact-training-mode", default="explore", choices=COMPACT_MODES,
                   help="explore: compact from the start, rebuilt at every event; frozen: masked until T_max, then "
                        "compact once (default explore)")
    g.add_argument("--chex-seed", type=int, default=None,
                   help="seed of the exploration RNG, shared by all ranks (default: --seed, or 0)")


def validate_chex_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with status 2 and one line naming the flag if a CHEX flag is out of range."""
    if not 0.0 <= args.channel_sparsity < 1.0:
        parser.error(f"--channel_sparsity must be in [0, 1), got {args.channel_sparsity}")
    if args.target_flops is None and not 0.0 <= args.init_channel_ratio <= args.channel_sparsity:
        parser.error(f"--init_channel_ratio must be in [0, --channel_sparsity={args.channel_sparsity}], "
                     f"got {args.init_channel_ratio}")
    if args.target_flops is not None and not 0.0 <= args.init_channel_ratio < 1.0:
        # the sparsity comes from the target, known once the model exists: explorer_from_args checks against it
        parser.error(f"--init_channel_ratio must be in [0, 1), got {args.init_channel_ratio}")
    if args.delta_T < 1:
        parser.error(f"--delta_T must be >= 1, got {args.delta_T}")
    if args.T_max < args.delta_T:
        parser.error(f"--T_max ({args.T_max}) must be >= --delta_T ({args.delta_T})")
    if args.chex_min_channels < 1:
        parser.error(f"--chex-min-channels must be >= 1, got {args.chex_min_channels}")
    if args.compact_training and not args.grow_prune:
        parser.error("--compact-training needs --grow_prune (there are no pruned channels to remove)")
    if args.round_to < 1:
        parser.error(f"--round-to must be >= 1, got {args.round_to}")
    if getattr(args, "chex_residual", False) and getattr(args, "chex_prune_downsample", False):
        parser.error("--chex-prune-downsample cannot be combined with --chex-residual: the residual groups already "
                     "explore the downsample convs (narrowably, as part of their stage's stream)")
    if args.target_flops is not None:
        try:
            parse_flops(args.target_flops, 1)
        except ValueError as e:
            parser.error(f"--target-flops: {e}")


def groups_from_args(args: argparse.Namespace, model: nn.Module, *, within: str = "",
                     stage_consumers: Mapping[str, Sequence[str]] | None = None) -> list[ChannelGroup]:
    """The model's channel groups: with the downsample convs when ``--chex-prune-downsample`` is set, with the
    residual groups when ``--chex-residual`` is (``within`` and ``stage_consumers`` as in
    :func:`chex_core.resnet_groups`; ``stage_consumers`` is only used with ``--chex-residual``)."""
    residual = bool(getattr(args, "chex_residual", False))
    return resnet_groups(model, include_downsample=bool(getattr(args, "chex_prune_downsample", False)),
                         residual=residual, within=within, stage_consumers=stage_consumers if residual else None)


def schedule_from_args(args: argparse.Namespace, steps_per_unit: int) -> ExplorationSchedule:
    return ExplorationSchedule(args.delta_T, args.T_max, args.channel_sparsity, args.init_channel_ratio,
                               steps_per_unit=max(1, int(steps_per_unit)))


def explorer_from_args(args: argparse.Namespace, model: nn.Module, groups: list[ChannelGroup],
                       steps_per_unit: int, input_size: tuple[int, int, int] = (3, 224, 224),
                       parser: argparse.ArgumentParser | None = None, *,
                       flops_within: str = "") -> ChannelExplorer | None:
    """A ChannelExplorer configured from the flags, or None when ``--grow_prune`` is off.

    With ``--target-flops`` the channel sparsity is derived from the target at ``input_size`` (and written back to
    ``args.channel_sparsity``); the MACs are those of the sub-module ``flops_within`` (e.g. ``"backbone"``; default
    the whole ``model``, see :class:`chex_core.budget.MacsModel`). An unreachable target is reported through
    ``parser.error`` (exit 2) when a parser is given, else as ``ValueError``.
    """
    if not args.grow_prune:
        return None

    def fail(msg: str):
        if parser is not None:
            parser.error(msg)
        raise ValueError(msg)

    seed = args.chex_seed if args.chex_seed is not None else (getattr(args, "seed", None) or 0)
    target = macs_model = None
    if args.target_flops is not None:
        macs_model = MacsModel(model, groups, input_size, within=flops_within)
        try:
            target = parse_flops(args.target_flops, macs_model.dense())
            report = sparsity_for_macs(macs_model, target, args.chex_min_channels, args.round_to)
        except ValueError as e:
            fail(f"--target-flops: {e}")
        log.info("%s", report)
        if args.init_channel_ratio > report.sparsity:
            fail(f"--init_channel_ratio ({args.init_channel_ratio}) exceeds the channel sparsity "
                 f"{report.sparsity:.4f} that --target-flops {args.target_flops} implies")
        args.channel_sparsity = report.sparsity
    return ChannelExplorer(model, groups, schedule_from_args(args, steps_per_unit), criterion=args.chex_criterion,
                           regrow=args.chex_regrow, allocation=args.chex_allocation,
                           min_channels=args.chex_min_channels, seed=seed, round_to=args.round_to,
                           target_macs=target, macs_model=macs_model)
