"""chex_core: CHEX channel exploration (Hou et al., CVPR 2022) for PyTorch CNNs.

Prune channels by column subset selection, regrow them by importance sampling with their most-recently-used values,
and re-allocate widths across layers from a global BatchNorm-γ ranking — during one training run from scratch.
Depends on torch, numpy and scipy only. See docs/API.md (the API) and docs/algorithm.md (the algorithm).
"""
from .compact import apply_width_spec, compact_model
from .explorer import ChannelExplorer, EventReport, NonFiniteWeightError
from .flops import count_macs, count_params, flop_counter_macs
from .groups import ChannelGroup, resnet_groups
from .layout import ChannelSlice, GroupLayout, group_layout, model_layout
from .schedule import ExplorationSchedule

__version__ = "0.1.0"

__all__ = ["ChannelGroup", "resnet_groups", "ChannelSlice", "GroupLayout", "group_layout", "model_layout",
           "ExplorationSchedule", "ChannelExplorer", "EventReport", "NonFiniteWeightError", "compact_model",
           "apply_width_spec", "count_macs", "count_params", "flop_counter_macs", "__version__"]
