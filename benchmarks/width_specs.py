"""Width specs of compact ResNets, with where they came from: the one file the speed benchmarks read widths from.

Why: a speed table of "compact CHEX models" is only as good as the per-layer widths it times. Widths picked by a few
SGD steps on random images prune the early layers hardest (γ moves only there), which is not what a trained CHEX run
picks. This module makes width specs from *actual CHEX training* and stores them, small and reviewable, in one JSON
file together with their provenance (command, epochs, machine, accuracy), so ``compact_speed.py`` (CPU) and
``gpu_check`` (GPU) time the same widths and say where they came from.

Sources of widths:
  - ``train``: runs ``CLS/main.py`` (the real CLS entry point, ``--grow_prune --target-flops B``) once per budget on
    the built-in digits data and reads the width spec (``cfg``) of the ``compact.pth`` it exports. With
    ``--target-flops`` every exploration event cuts the global |γ| ranking where the final model meets the budget at
    224 px, so the learned allocation — not a uniform one — decides each layer's width. Budgets run in sequence;
    each is resumable (``--resume auto``) and the JSON is rewritten after each one, so an interrupted job loses at
    most one budget's progress.
  - ``from-checkpoint``: a compact ``compact.pth`` (its ``cfg``), a compact state dict (producer shapes), or a dense
    checkpoint with zeroed channels such as the upstream releases (a channel counts as kept unless its norm γ and
    β are both exactly zero, the convention of ``CLS.model.masks_from_zeros``).

File format (``"format": "chex-width-specs/1"``): ``{"format", "arch", "specs": {name: {"width_spec": {group:
width}, "macs_224": int, ...provenance}}}``; a group is named after its producer conv, and specs of ``--chex-residual``
runs (``chex-res-*``) also name residual streams (``layerK.residual``, ``conv1``). :func:`load_specs` also reads the older ``compact_speed`` result JSON
(rows holding ``width_spec``), so ``--widths-from`` keeps accepting those.

    python benchmarks/width_specs.py train            # rewrites benchmarks/widths/resnet50_digits.json (4 runs, 1 core)
    python benchmarks/width_specs.py train --budgets chex-1G --out part.json   # one budget (run several side by side)
    python benchmarks/width_specs.py train --residual  # adds chex-res-3G ... chex-res-0.8G (--chex-residual runs)
    python benchmarks/width_specs.py from-checkpoint chex-1G=ckpt.pth.tar --out my_widths.json
    python benchmarks/width_specs.py show benchmarks/widths/resnet50_digits.json
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision

if __package__ in (None, ""):          # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chex_core import apply_width_spec, count_macs, resnet_groups  # noqa: E402

FORMAT = "chex-width-specs/1"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_FILE = REPO / "benchmarks" / "widths" / "resnet50_digits.json"
FLOPS_SIZE = (3, 224, 224)
STAGES = ("layer1", "layer2", "layer3", "layer4")
# The upstream ResNet-50 table's budgets and the δ0 of their launch scripts (scripts/cls_resnet50_*.sh); the 3G row's
# δ0 is capped below the sparsity that --target-flops 3G implies (0.21), as δ0 <= S is required.
BUDGETS = {"chex-3G": ("3G", 0.2), "chex-2G": ("2G", 0.3), "chex-1G": ("1G", 0.3), "chex-0.8G": ("0.8G", 0.3)}
# With --chex-residual the same budgets imply lower channel sparsities (0.148 / 0.308 / 0.516 / 0.567: the streams'
# channels count too), so the 3G row's δ0 is capped again, below 0.148.
RESIDUAL_DELTA0 = {"chex-3G": 0.14}


class WidthSpecError(ValueError):
    """A width-spec file or checkpoint that cannot be used (one line, for the command line)."""


# --------------------------------------------------------------------------------------------------- reading
def dense_model(arch: str) -> torch.nn.Module:
    if arch not in ("resnet18", "resnet34", "resnet50", "resnet101"):
        raise WidthSpecError(f"unsupported arch {arch!r}")
    return getattr(torchvision.models, arch)(weights=None)


def group_sizes(arch: str, residual: bool = False) -> dict[str, int]:
    """Full width of every inner (prunable) group, by name (= its producer conv); with ``residual`` also of every
    residual-stream group (``layerK.residual``, ``conv1``; ``--chex-residual``)."""
    return dict(_group_sizes(arch, residual))


@functools.lru_cache(maxsize=None)
def _group_sizes(arch: str, residual: bool) -> tuple[tuple[str, int], ...]:   # building a ResNet-50 takes ~0.3 s
    return tuple((g.name, g.size) for g in resnet_groups(dense_model(arch), residual=residual)
                 if g.kind in ("inner", "residual"))


def check_spec(arch: str, spec: Mapping[str, int], name: str) -> dict[str, int]:
    """``spec`` as a plain dict after checking it names every inner group of the arch (and, from a
    ``--chex-residual`` run, residual-stream groups), widths in [1, full]."""
    inner, sizes = group_sizes(arch), group_sizes(arch, residual=True)
    if not set(inner) <= set(spec) <= set(sizes):
        missing, extra = sorted(set(inner) - set(spec)), sorted(set(spec) - set(sizes))
        raise WidthSpecError(f"{name}: width spec does not match {arch} (missing {missing[:3]}, unknown {extra[:3]})")
    bad = [k for k, w in spec.items() if not 1 <= int(w) <= sizes[k]]
    if bad:
        raise WidthSpecError(f"{name}: widths out of range for {bad[:3]}")
    return {k: int(spec[k]) for k in sizes if k in spec}


def load_specs(path: str | os.PathLike) -> dict:
    """``{"arch", "specs": {name: entry}, "source"}`` from a width-spec file or an older compact_speed JSON."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WidthSpecError(f"{path}: cannot read a width-spec JSON ({exc})") from None
    if isinstance(data, dict) and data.get("format") == FORMAT:
        arch, specs = data.get("arch"), data.get("specs", {})
    elif isinstance(data, dict) and "rows" in data and "meta" in data:          # compact_speed result file
        arch = data["meta"].get("arch")
        specs = {r["model"]: {k: v for k, v in r.items() if k in ("width_spec", "sparsity_final", "masked_macs")}
                 for r in data["rows"] if "width_spec" in r and "round_to" not in r}
    else:
        raise WidthSpecError(f"{path}: neither a {FORMAT} file nor a compact_speed result JSON")
    if not isinstance(specs, dict) or not specs:
        raise WidthSpecError(f"{path}: holds no width specs")
    for name, entry in specs.items():
        entry["width_spec"] = check_spec(arch, entry.get("width_spec") or {}, f"{path}: {name}")
    return {"arch": arch, "specs": specs, "source": str(path), "provenance": data.get("provenance", {})}


def rounded(spec: Mapping[str, int], sizes: Mapping[str, int], multiple: int) -> dict[str, int]:
    """Every width rounded up to a multiple of ``multiple`` (what ``--round-to`` keeps), capped at full width."""
    return {k: min(sizes[k], -(-int(w) // multiple) * multiple) for k, w in spec.items()}


def build_compact(arch: str, spec: Mapping[str, int], seed: int = 0) -> torch.nn.Module:
    """A freshly initialised network with these widths (speed depends on the widths, not the values)."""
    torch.manual_seed(seed)
    return apply_width_spec(dense_model(arch), dict(spec))


def macs_224(arch: str, spec: Mapping[str, int]) -> int:
    return int(count_macs(build_compact(arch, spec), FLOPS_SIZE, zero_aware=False))


def keep_per_stage(arch: str, spec: Mapping[str, int]) -> dict[str, float]:
    """Kept share of each stage's inner channels (residual streams: :func:`keep_residual`)."""
    sizes = group_sizes(arch)
    return {s: round(sum(w for k, w in spec.items() if k in sizes and k.startswith(s)) /
                     sum(n for k, n in sizes.items() if k.startswith(s)), 3) for s in STAGES}


def keep_residual(arch: str, spec: Mapping[str, int]) -> dict[str, float]:
    """Kept share of each residual stream a ``--chex-residual`` spec names (empty for internal-only specs)."""
    sizes, inner = group_sizes(arch, residual=True), group_sizes(arch)
    return {k: round(w / sizes[k], 3) for k, w in spec.items() if k not in inner}


# --------------------------------------------------------------------------------------------------- checkpoints
def spec_from_checkpoint(path: str | os.PathLike, arch: str) -> dict[str, int]:
    """Width spec of a compact.pth (``cfg``), a compact state dict (shapes) or a dense one with zeroed channels."""
    from chex_core.checkpoint import CheckpointError, load_checkpoint, strip_prefix

    try:
        ckpt = load_checkpoint(str(path))
    except CheckpointError as exc:
        raise WidthSpecError(str(exc).splitlines()[0]) from None
    if isinstance(ckpt.get("cfg"), Mapping):
        return check_spec(arch, ckpt["cfg"], str(path))
    sd = strip_prefix(ckpt.get("state_dict", ckpt))
    model = dense_model(arch)
    spec = {}
    named = dict(model.named_modules())
    for g in resnet_groups(model):       # inner groups only: a residual run's compact.pth carries its cfg
        w, gamma, beta = (sd.get(f"{g.producer}.weight"), sd.get(f"{g.norm}.weight"), sd.get(f"{g.norm}.bias"))
        if w is None or gamma is None or beta is None:
            raise WidthSpecError(f"{path}: no {g.producer}/{g.norm} tensors for --arch {arch}")
        if w.shape[0] != named[g.producer].out_channels:          # already compact: the shapes are the widths
            spec[g.producer] = int(w.shape[0])
        else:                                                      # dense with zeroed channels (upstream releases)
            spec[g.producer] = max(1, int(((gamma != 0) | (beta != 0)).sum()))
    return check_spec(arch, spec, str(path))


# --------------------------------------------------------------------------------------------------- provenance
def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "python":
            platform.python_version(), "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def write_specs(path: Path, arch: str, specs: dict, provenance: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "arch": arch, "provenance": provenance, "specs": specs},
                              indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------- train
def spec_name(budget: str, residual: bool) -> str:
    """``chex-1G`` (internal groups) or ``chex-res-1G`` (``--chex-residual``)."""
    return budget.replace("chex-", "chex-res-") if residual else budget


def cls_command(args: argparse.Namespace, name: str, workspace: Path) -> list[str]:
    """The CLS/main.py command of one budget: CHEX with --target-flops on the built-in digits data (with
    ``args.residual`` also exploring the residual streams)."""
    budget, delta0 = BUDGETS[name]
    residual = getattr(args, "residual", False)
    if residual:
        delta0 = RESIDUAL_DELTA0.get(name, delta0)
    t_max = max(1, round(0.72 * args.epochs))          # upstream: T_max 180 of 250 epochs
    return [sys.executable, str(REPO / "CLS" / "main.py"), "--data-backend", "digits", "--arch", args.arch,
            "--image-size", str(args.image_size), "--epochs", str(args.epochs), "--warmup", "1",
            "-b", str(args.batch), "--lr", str(args.lr), "--lr-schedule", "cosine", "--wd", "5e-4",
            "--label-smoothing", "0.1", "-j", "0", "--seed", str(args.seed), "--grow_prune", "--delta_T", "1",
            "--T_max", str(t_max), "--channel_sparsity", "0.5", "--init_channel_ratio", str(delta0),
            "--target-flops", budget, "--compact-training", "--workspace", str(workspace), "--resume", "auto",
            "--raport-file", "raport.json", "--keep-checkpoints", "1", "--no-progress", "-p", "50",
            *(["--chex-residual"] if residual else [])]


def train(args: argparse.Namespace) -> dict:
    """Run every requested budget in sequence; after each, add its spec to ``args.out`` (rewritten atomically)."""
    old = load_specs(args.out) if args.out.is_file() else {"specs": {}, "provenance": {}}
    specs = old["specs"]
    run = {"what": "CHEX training (CLS/main.py --grow_prune --target-flops B --compact-training) on the built-in "
                   "sklearn digits data; widths = cfg of the exported compact.pth",
           "machine": machine(), "threads": os.environ.get("OMP_NUM_THREADS"), "git_commit": git_commit()}
    # the internal-only runs describe the file; --residual runs add their own record and keep that description
    prov = {**old["provenance"], "residual_runs": {**run, "what": run["what"] + ", with --chex-residual"}} \
        if args.residual else run
    for budget in args.budgets:
        name = spec_name(budget, args.residual)
        ws = args.workdir / name
        cmd = cls_command(args, budget, ws)
        print(f"[width_specs] {name}: {' '.join(cmd)}", flush=True)
        with open(args.workdir / f"{name}.log", "a") as logf:
            rc = subprocess.run(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise WidthSpecError(f"{name}: CLS/main.py exited {rc} (log: {args.workdir / name}.log)")
        spec = spec_from_checkpoint(ws / "compact.pth", args.arch)
        raport = json.loads((ws / "raport.json").read_text())
        final = raport.get("final", {})
        shown = [c if not c.startswith(str(REPO)) else os.path.relpath(c, REPO) for c in cmd[1:]]
        specs[name] = {"width_spec": spec, "macs_224": macs_224(args.arch, spec), "target": BUDGETS[budget][0],
                       "keep_fraction_per_stage": keep_per_stage(args.arch, spec),
                       **({"keep_fraction_residual": keep_residual(args.arch, spec)} if args.residual else {}),
                       "sparsity": raport.get("args", {}).get("channel_sparsity"), "compact_top1": final.get("compact_top1"),
                       "epochs": args.epochs, "image_size": args.image_size,
                       "command": "python " + " ".join(shown),
                       "train_time_s": round(sum(e.get("time_s", 0.0) for e in raport.get("epochs", [])))}
        print(f"[width_specs] {name}: {specs[name]['macs_224'] / 1e9:.3f} G MACs, keep per stage "
              f"{specs[name]['keep_fraction_per_stage']}, top-1 {specs[name]['compact_top1']}", flush=True)
        write_specs(args.out, args.arch, specs, prov)
    return specs


def show(path: Path) -> None:
    data = load_specs(path)
    dense = macs_224(data["arch"], group_sizes(data["arch"]))
    print(f"{path}: {data['arch']}, dense {dense / 1e9:.3f} G MACs at 224 px")
    for name, e in data["specs"].items():
        spec = e["width_spec"]
        print(f"  {name:<10} {macs_224(data['arch'], spec) / 1e9:.3f} G  keep per stage "
              f"{keep_per_stage(data['arch'], spec)}  {e.get('command', '')[:80]}")


def from_checkpoints(args: argparse.Namespace) -> dict:
    specs = load_specs(args.out)["specs"] if args.out.is_file() else {}
    for item in args.checkpoints:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise WidthSpecError(f"expected NAME=PATH, got {item!r}")
        spec = spec_from_checkpoint(path, args.arch)
        specs[name] = {"width_spec": spec, "macs_224": macs_224(args.arch, spec),
                       "keep_fraction_per_stage": keep_per_stage(args.arch, spec), "checkpoint": os.path.basename(path)}
    write_specs(args.out, args.arch, specs, {"what": "widths read from checkpoints", "machine": machine()})
    return specs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="make width specs by CHEX training on the digits data (CLS/main.py)")
    t.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS),
                   help="which budgets to train, in order (default: all four)")
    t.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet101"], help="network (default resnet50)")
    t.add_argument("--residual", action="store_true",
                   help="train with --chex-residual (residual streams explored too); the specs are stored as "
                        "chex-res-<budget>, next to the internal-only ones")
    t.add_argument("--epochs", type=int, default=12, help="epochs per budget (default 12; T_max = 0.72 x epochs)")
    t.add_argument("--image-size", type=int, default=32, help="training resolution in pixels (default 32; the digits are 8x8)")
    t.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    t.add_argument("--lr", type=float, default=0.2, help="peak learning rate (default 0.2)")
    t.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    t.add_argument("--workdir", type=Path, default=REPO / "runs" / "width_specs",
                   help="workspaces and logs of the runs (default runs/width_specs)")
    t.add_argument("--out", type=Path, default=DEFAULT_FILE, help="width-spec JSON to write (default %(default)s)")
    c = sub.add_parser("from-checkpoint", help="read width specs from checkpoints (compact or zeroed channels)")
    c.add_argument("checkpoints", nargs="+", metavar="NAME=PATH", help="e.g. chex-1G=resnet50_1G.pth.tar")
    c.add_argument("--arch", default="resnet50", choices=["resnet18", "resnet34", "resnet50", "resnet101"],
                   help="network the checkpoints are of (default resnet50)")
    c.add_argument("--out", type=Path, required=True, help="width-spec JSON to write (existing names are kept)")
    s = sub.add_parser("show", help="print a width-spec file's MACs and keep fractions")
    s.add_argument("file", type=Path, help="width-spec JSON (or a compact_speed result JSON)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.cmd == "train":
            if args.epochs < 2 or args.image_size < 8 or args.batch < 1:
                parser.error("--epochs must be >= 2, --image-size >= 8, --batch >= 1")
            args.workdir.mkdir(parents=True, exist_ok=True)
            train(args)
        elif args.cmd == "from-checkpoint":
            from_checkpoints(args)
        else:
            show(args.file)
    except WidthSpecError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
