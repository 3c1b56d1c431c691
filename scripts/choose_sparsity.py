"""Choose ``--channel_sparsity`` so a CHEX ResNet lands near a target FLOPs figure, and check it.

For each (arch, target GMACs) the script bisects the sparsity S of a *uniform* allocation (every prunable group keeps
``round((1-S)·C)`` channels, top-L1 filters of a random init, exactly ``ChannelExplorer.start()`` with δ0 = 0) until
the zero-aware MAC count at 224×224 (the paper's FLOPs convention, ``chex_core.count_macs``) reaches the target,
then prints the check: dense MACs, MACs at the chosen S, reduction, and the compact model's true MACs.

The learned global-|γ| allocation of a real run moves channels between layers, so its final FLOPs differ from the
uniform estimate by a few percent; evaluate the trained checkpoint (``CLS/main.py --evaluate``) for the real figure.

    python scripts/choose_sparsity.py                       # every row of the upstream ImageNet table
    python scripts/choose_sparsity.py --arch resnet50 --target 2.0
    python scripts/choose_sparsity.py --reach               # what MAC fractions each kind of group can reach

``--reach`` prints, per architecture, the fraction of the dense MACs left when every explored group keeps a share k
of its channels (uniformly), and the floor (every group at one channel; at eight with ``--round-to 8``), once for
block-internal groups only (upstream) and once with the residual streams explored too (``--chex-residual``). Computed
with ``chex_core.budget.MacsModel`` (equal to ``count_macs`` of the compact model).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

import torch  # noqa: E402

from chex_core import ChannelExplorer, ExplorationSchedule, compact_model, count_macs, resnet_groups  # noqa: E402
from chex_core.budget import MacsModel  # noqa: E402
from CLS.model import build_model  # noqa: E402

# (arch, GMACs) rows of the upstream README table
TABLE = [("resnet18", 1.03), ("resnet34", 2.0), ("resnet50", 3.0), ("resnet50", 2.0), ("resnet50", 1.0),
         ("resnet50", 0.8), ("resnet101", 3.4), ("resnet101", 1.9)]


def masked_model(arch: str, sparsity: float, image_size: int):
    """A random-init ``arch`` with a uniform mask at ``sparsity``; returns (model, explorer)."""
    torch.manual_seed(0)
    model = build_model(arch, 1000, conv_init="fan_out", bn_gamma=0.5)
    groups = resnet_groups(model)
    explorer = ChannelExplorer(model, groups, ExplorationSchedule(1, 1, sparsity, 0.0), allocation="uniform")
    explorer.start()
    return model, explorer


def choose(arch: str, target_gmacs: float, image_size: int = 224, tol: float = 1e-3) -> dict:
    """Bisect S in [0, 0.99] so that the masked model's zero-aware MACs ≈ ``target_gmacs``·1e9."""
    size = (3, image_size, image_size)
    target = target_gmacs * 1e9
    lo, hi = 0.0, 0.99
    dense = count_macs(build_model(arch, 1000), size, zero_aware=False)
    if target >= dense:
        raise SystemExit(f"{arch}: target {target_gmacs}G is not below the dense {dense / 1e9:.3f}G")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        model, _ = masked_model(arch, mid, image_size)
        if count_macs(model, size) > target:
            lo = mid
        else:
            hi = mid
    s = round(hi, 3)
    model, explorer = masked_model(arch, s, image_size)
    macs = count_macs(model, size)
    small, _ = compact_model(model, explorer.groups, explorer.masks)
    return {"arch": arch, "target": target_gmacs, "sparsity": s, "dense": dense, "macs": macs,
            "compact": count_macs(small, size, zero_aware=False)}


KEEP_SHARES = (0.5, 0.25, 0.1, 0.05)


def reach(arch: str, image_size: int = 224) -> dict[str, dict]:
    """MAC fractions of dense at uniform keep shares and at the floors, internal-only vs with residual groups."""
    model = build_model(arch, 1000)
    out = {}
    for kind, residual in (("internal", False), ("residual", True)):
        groups = resnet_groups(model, residual=residual)
        macs = MacsModel(model, groups, (3, image_size, image_size))
        dense = macs.dense()
        out[kind] = {"keep": {k: macs.macs({g.name: max(1, round(k * g.size)) for g in groups}) / dense
                              for k in KEEP_SHARES},
                     "floor": macs.floor() / dense, "floor_round8": macs.floor(1, 8) / dense}
    return out


def print_reach(archs: list[str], image_size: int) -> None:
    head = " ".join(f"{'k=' + str(k):>7s}" for k in KEEP_SHARES)
    print(f"{'arch':10s} {'groups':9s} {head} {'floor':>7s} {'floor/8':>7s}   (fraction of dense MACs)")
    for arch in archs:
        for kind, r in reach(arch, image_size).items():
            cells = " ".join(f"{r['keep'][k]:7.4f}" for k in KEEP_SHARES)
            print(f"{arch:10s} {kind:9s} {cells} {r['floor']:7.4f} {r['floor_round8']:7.4f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted({a for a, _ in TABLE}), default=None,
                   help="one architecture (default: every row of the upstream table)")
    p.add_argument("--target", type=float, default=None, help="target GMACs at 224x224 (with --arch)")
    p.add_argument("--image-size", type=int, default=224, help="input size of the FLOPs count")
    p.add_argument("--reach", action="store_true",
                   help="print the MAC fractions reachable with internal groups only and with residual groups "
                        "(--chex-residual), for --arch or every architecture of the table")
    args = p.parse_args()
    if args.reach:
        print_reach([args.arch] if args.arch else sorted({a for a, _ in TABLE}), args.image_size)
        return
    if (args.arch is None) != (args.target is None):
        p.error("--arch and --target go together")
    rows = [(args.arch, args.target)] if args.arch else TABLE
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(f"{'arch':10s} {'target':>7s} {'S':>6s} {'dense':>8s} {'masked':>8s} {'compact':>8s} {'reduction':>9s}")
    for arch, target in rows:
        r = choose(arch, target, args.image_size)
        print(f"{arch:10s} {target:6.2f}G {r['sparsity']:6.3f} {r['dense'] / 1e9:7.3f}G {r['macs'] / 1e9:7.3f}G "
              f"{r['compact'] / 1e9:7.3f}G {100 * (1 - r['macs'] / r['dense']):8.1f}%", flush=True)


if __name__ == "__main__":
    main()
