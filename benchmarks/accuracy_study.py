"""Accuracy study: CHEX against independent channel-pruning baselines at equal MACs, equal epochs, equal optimiser.

Task (``--task``, see ``benchmarks/study/tasks.py``): ``photo-patches`` (default) — which of 17 real photos shipped with
scikit-image / scikit-learn a 24×24 grey, per-patch-standardised patch comes from, with training and validation patches
cut from disjoint cells of every photo (no pixel of a validation patch is ever trained on) — or ``digits`` (sklearn's
8×8 digits upsampled, the first study's task, on which every method ties).

Model: a CIFAR-style ResNet of torchvision ``BasicBlock``s (``benchmarks/study/model.py``). Budgets (``--budgets``):
fractions of the dense network's MACs (``chex_core.count_macs``, the paper's convention). Methods (``--methods``, see
``benchmarks/study/methods.py``): ``dense``; ``chex`` (chex_core defaults, block-internal channels, budgeted like
``--target-flops``); ``chex-residual`` (the residual stream explored too, as coupled groups; listed when chex_core
has them); Torch-Pruning's group-L1 pruning at initialisation (``tp-l1-init``) and after half the training with
fine-tuning (``tp-l1-half``); and the first study's baselines and CHEX ablations.

Training-length axis: ``--epochs 15 45 90`` runs every budget at the first length and the budgets in
``--long-budgets`` at the others. Every run is written to ``--runs-dir`` as soon as it finishes and skipped when the
study is started again, so an interrupted sweep resumes where it stopped. The JSON with every run, two CSVs (summary
and runs), a markdown table with verdicts and PNG plots go to ``--out``.

    python benchmarks/accuracy_study.py                      # the committed study (hours on 2 CPU cores)
    python benchmarks/accuracy_study.py --quick --out /tmp/q # seconds, for CI smoke
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):          # run as a script: make `benchmarks.*` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_info  # noqa: E402
from benchmarks.study import report  # noqa: E402
from benchmarks.study.methods import ABLATIONS, LEGACY, methods_available, run_one  # noqa: E402
from benchmarks.study.model import CifarResNet  # noqa: E402,F401  (re-exported: tests build the study's model)
from benchmarks.study.tasks import TASKS, load_task  # noqa: E402
from chex_core import count_macs  # noqa: E402

log = logging.getLogger("accuracy_study")

CFG_KEYS = ("task", "res", "blocks", "widths", "batch", "lr", "wd", "val_frac", "split_seed", "photo_side", "grid",
            "min_std", "val_per_class", "train_per_epoch", "delta_t", "t_max_frac", "delta0", "slim_lambda",
            "slim_frac")


def default_methods() -> list[str]:
    return [m for m in methods_available() if m not in LEGACY + ABLATIONS]


# ------------------------------------------------------------------------------------------------------------ jobs
def build_jobs(args: argparse.Namespace, cfg: dict, threads: int) -> list[dict]:
    """Every (method, budget, epochs, seed) of the sweep, most wanted first: all budgets at the first length, then
    each of ``--long-budgets`` in the order given at the other lengths; ablations at the first length and
    ``--ablation-budgets`` only; dense once per length."""
    def block(epochs: int, budgets: list[float], ablations: list[float], with_dense: bool) -> list[dict]:
        out = []
        for seed in range(args.seeds):
            for m in args.methods:
                bs = ([1.0] if with_dense else []) if m == "dense" else ablations if m in ABLATIONS else budgets
                out += [{"cfg": cfg, "method": m, "budget": b, "epochs": epochs, "seed": seed, "threads": threads}
                        for b in bs]
        return out

    jobs = block(args.epochs[0], args.budgets, args.ablation_budgets, True)
    for i, b in enumerate(args.long_budgets):
        for epochs in args.epochs[1:]:
            jobs += block(epochs, [b], [], i == 0)
    return jobs


def run_path(runs_dir: Path, job: dict) -> Path:
    return runs_dir / f"{job['method']}__b{job['budget']:g}__e{job['epochs']}__s{job['seed']}.json"


def run_and_save(job: dict, runs_dir: str) -> dict:
    """Worker entry: train one run and write it atomically, so a killed sweep keeps every finished run."""
    logging.getLogger("chex_core").setLevel(logging.WARNING)          # one line per event would drown the progress
    run = run_one(job)
    path = run_path(Path(runs_dir), job)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"cfg": job["cfg"], "run": run}, indent=1))
    os.replace(tmp, path)
    return run


def load_done(runs_dir: Path, jobs: list[dict]) -> tuple[list[dict], list[dict]]:
    """Split ``jobs`` into runs already on disk (same configuration) and jobs still to do.

    Raises:
        ValueError: a run file of this sweep was written with another configuration.
    """
    done, todo = [], []
    for j in jobs:
        p = run_path(runs_dir, j)
        if not p.is_file():
            todo.append(j)
            continue
        saved = json.loads(p.read_text())
        if saved["cfg"] != j["cfg"]:
            raise ValueError(f"{p} was written with another configuration; use another --runs-dir or delete it")
        done.append(saved["run"])
    return done, todo


def execute(jobs: list[dict], runs_dir: Path, n_workers: int, tol: float) -> list[dict]:
    runs = []
    if n_workers == 1:
        for j in jobs:
            runs.append(run_and_save(j, str(runs_dir)))
            _progress(runs[-1], len(runs), len(jobs), tol)
        return runs
    with cf.ProcessPoolExecutor(n_workers, mp_context=mp.get_context("spawn")) as pool:
        for fut in cf.as_completed([pool.submit(run_and_save, j, str(runs_dir)) for j in jobs]):
            runs.append(fut.result())
            _progress(runs[-1], len(runs), len(jobs), tol)
    return runs


def _progress(r: dict, i: int, n: int, tol: float) -> None:
    flag = "  <-- MACs off budget" if abs(r["macs_error"]) > tol and r["method"] != "dense" else ""
    log.info("[%d/%d] %-13s %5.1f%% MACs %3d ep seed %d: top-1 %.2f%%  MACs %+.1f%% of budget  %.0f s CPU%s", i, n,
             r["method"], 100 * r["budget"], r["epochs"], r["seed"], r["val_top1"], 100 * r["macs_error"], r["cpu_s"],
             flag)


# ----------------------------------------------------------------------------------------------------------- args
QUICK = {"seeds": 2, "epochs": [2, 3], "budgets": [0.5], "long_budgets": [0.5], "ablation_budgets": [0.5],
         "res": 8, "blocks": 1, "widths": [8, 8, 16], "batch": 32, "photo_side": 48, "val_per_class": 8,
         "train_per_epoch": 128, "val_frac": 0.5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--task", choices=TASKS, default="photo-patches", help="the data set (default %(default)s)")
    a("--out", type=Path, default=Path("benchmarks/results"), help="output folder (default %(default)s)")
    a("--name", default="accuracy_study", help="stem of the output files (default %(default)s; --quick adds _quick)")
    a("--runs-dir", type=Path, default=None,
      help="one JSON per finished run, reused when the sweep restarts (default OUT/NAME_runs)")
    a("--seeds", type=int, default=5, help="training seeds per (method, budget, epochs) (default 5)")
    a("--epochs", type=int, nargs="+", default=[15, 45, 90],
      help="training lengths; the first runs at every budget (default 15 45 90)")
    a("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.12],
      help="MACs budgets as fractions of the dense network, in (0, 1) (default 0.5 0.25 0.12)")
    a("--long-budgets", type=float, nargs="*", default=[0.25, 0.12, 0.5],
      help="budgets also run at the longer --epochs, in this order (default 0.25 0.12 0.5)")
    a("--ablation-budgets", type=float, nargs="*", default=[],
      help="budgets at which the CHEX ablations run, first length only (default none)")
    a("--methods", nargs="+", default=None, help=f"methods to run (default {' '.join(default_methods())}; "
      f"available: {' '.join(methods_available())})")
    a("--res", type=int, default=24, help="input size in px (default 24)")
    a("--blocks", type=int, default=2, help="BasicBlocks per stage (default 2)")
    a("--widths", type=int, nargs=3, default=[16, 32, 64], help="stage widths (default 16 32 64)")
    a("--batch", type=int, default=64, help="batch size (default 64)")
    a("--lr", type=float, default=0.1, help="peak learning rate, cosine to 0 (default 0.1)")
    a("--wd", type=float, default=5e-4, help="weight decay (default 5e-4)")
    a("--split-seed", type=int, default=0, help="seed of the train/validation split (default 0)")
    a("--val-frac", type=float, default=0.25, help="digits: held-out validation fraction (default 0.25)")
    a("--photo-side", type=int, default=256, help="photo-patches: shorter side of every photo in px (default 256)")
    a("--grid", type=int, default=4, help="photo-patches: cells per side; one per row is validation (default 4)")
    a("--min-std", type=float, default=0.02, help="photo-patches: reject flatter patches (default 0.02)")
    a("--val-per-class", type=int, default=128, help="photo-patches: validation patches per photo (default 128)")
    a("--train-per-epoch", type=int, default=2048, help="photo-patches: random crops per epoch (default 2048)")
    a("--delta-t", type=int, default=1, help="CHEX ΔT in epochs (default 1)")
    a("--t-max-frac", type=float, default=0.7, help="CHEX T_max as a fraction of the epochs (paper 180/250; 0.7)")
    a("--delta0", type=float, default=0.3, help="CHEX δ0 cap; δ0 = min(this, S/2) (default 0.3)")
    a("--slim-lambda", type=float, default=5e-3, help="slimming: L1 weight on γ (default 5e-3)")
    a("--slim-frac", type=float, default=0.5, help="slimming: share of the epochs with the L1 term (default 0.5)")
    a("--flops-tol", type=float, default=0.03, help="runs further than this from their budget are flagged (0.03)")
    a("--jobs", type=int, default=1, help="parallel worker processes (default 1)")
    a("--threads", type=int, default=0, help="torch threads per worker (default OMP_NUM_THREADS or cores // jobs)")
    a("--no-plot", action="store_true", help="skip the PNG plot")
    a("--report-only", action="store_true",
      help="train nothing: write the reports from the runs already in --runs-dir (a sweep still in progress)")
    a("--from-json", type=Path, default=None,
      help="do not train: rebuild the CSV/markdown/PNG next to this saved sweep JSON from its runs")
    a("--quick", action="store_true",
      help="CI smoke: a tiny net on 8-px patches, 2 seeds, 2 and 3 epochs, budget 0.5 (seconds); other flags still "
           "apply")
    args = p.parse_args(argv)
    if args.quick:                        # tiny defaults; flags given explicitly still win
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    _validate(p, args)
    return args


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    available = methods_available()
    args.methods = args.methods or default_methods()
    bad = [m for m in args.methods if m not in available]
    if bad:
        hint = " (chex-residual needs a chex_core with coupled residual groups)" if "chex-residual" in bad else ""
        p.error(f"--methods: unknown or unavailable {bad}; choose from {list(available)}{hint}")
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    if min(args.epochs) < 2 or sorted(set(args.epochs)) != args.epochs:
        p.error(f"--epochs must be increasing values >= 2 (prune-after-training needs two phases), got {args.epochs}")
    for flag, vals in (("--budgets", args.budgets), ("--long-budgets", args.long_budgets),
                       ("--ablation-budgets", args.ablation_budgets)):
        if [v for v in vals if not 0 < v < 1]:
            p.error(f"{flag} must be fractions of the dense MACs in (0, 1), got {vals}")
    if not set(args.long_budgets) <= set(args.budgets):
        p.error(f"--long-budgets {args.long_budgets} must be among --budgets {args.budgets}")
    if args.res < 4:
        p.error(f"--res must be >= 4 px, got {args.res}")
    if args.task == "photo-patches" and args.photo_side < args.grid * args.res:
        p.error(f"--photo-side ({args.photo_side}) must be >= --grid × --res ({args.grid * args.res})")
    for flag, v, lo in (("--val-frac", args.val_frac, 0), ("--slim-frac", args.slim_frac, 0),
                        ("--t-max-frac", args.t_max_frac, 0)):
        if not lo < v <= (1 if flag == "--t-max-frac" else 0.999):
            p.error(f"{flag} must be in (0, 1), got {v}")
    for flag, v in (("--delta-t", args.delta_t), ("--jobs", args.jobs), ("--grid", args.grid),
                    ("--val-per-class", args.val_per_class), ("--train-per-epoch", args.train_per_epoch)):
        if v < 1:
            p.error(f"{flag} must be >= 1, got {v}")
    if args.from_json is not None and not args.from_json.is_file():
        p.error(f"--from-json: no such file {args.from_json}")


# ----------------------------------------------------------------------------------------------------------- main
def describe(cfg: dict, task) -> tuple[str, str]:
    if cfg["task"] == "digits":
        t = f"sklearn digits ({cfg['res']}×{cfg['res']} px, {len(task.y_val)} held-out images)"
    else:
        t = (f"photo-patches ({task.num_classes} photos, {cfg['res']}×{cfg['res']} grey patches standardised per "
             f"patch, {cfg['train_per_epoch']} fresh random crops per epoch, {len(task.y_val)} validation patches "
             "from disjoint cells)")
    m = f"CIFAR-style ResNet ({cfg['blocks']} BasicBlocks × 3 stages, widths {tuple(cfg['widths'])})"
    return t, m


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        rows = write_reports(saved["config"], saved["runs"], saved["meta"], args.from_json.parent,
                             args.from_json.stem, plot_png=not args.no_plot)
        return {"summary": rows, "runs": saved["runs"], "meta": saved["meta"]}
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", 0)) // args.jobs or \
        max(1, (os.cpu_count() or 1) // args.jobs)
    cfg = {k: getattr(args, k) for k in CFG_KEYS}
    stem = args.name + ("_quick" if args.quick else "")
    runs_dir = args.runs_dir or args.out / f"{stem}_runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    jobs = build_jobs(args, cfg, threads)
    try:
        done, todo = load_done(runs_dir, jobs)
    except ValueError as e:
        print(f"accuracy_study.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    task = load_task(cfg)
    dense_macs = count_macs(CifarResNet(args.blocks, tuple(args.widths), num_classes=task.num_classes),
                            task.in_size, zero_aware=False)
    log.info("%d runs (%d already in %s), %d worker(s) × %d thread(s); dense net %.2f M MACs", len(jobs), len(done),
             runs_dir, args.jobs, threads, dense_macs / 1e6)
    load_before = machine_info().get("loadavg_1m")
    t0 = time.perf_counter()
    if args.report_only:
        if not done:
            print(f"accuracy_study.py: error: --report-only: no finished run of this sweep in {runs_dir}",
                  file=sys.stderr)
            raise SystemExit(2)
        todo = []
    runs = done + execute(todo, runs_dir, args.jobs, args.flops_tol)
    task_text, model_text = describe(cfg, task)
    meta = {"machine": machine_info(), "loadavg_1m_before": load_before, "wall_s_last_invocation":
            time.perf_counter() - t0, "jobs": args.jobs, "threads_per_job": threads, "dense_macs": dense_macs,
            "command": " ".join(sys.argv), "commit": _commit(), "flops_tol": args.flops_tol, "seeds": args.seeds,
            "n_val": len(task.y_val), "task_text": task_text, "model_text": model_text, "task_info": task.info,
            "resumed_runs": len(done)}
    meta["loadavg_1m_after"] = meta["machine"].get("loadavg_1m")
    runs.sort(key=lambda r: (r["epochs"], -r["budget"], report.ORDER.index(r["method"]), r["seed"]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"config": cfg, "meta": meta, "runs": runs}, indent=1))
    rows = write_reports(cfg, runs, meta, args.out, stem, plot_png=not args.no_plot)
    log.info("wrote %s/%s.{json,csv,md%s}", args.out, stem, "" if args.no_plot else ",png")
    return {"summary": rows, "runs": runs, "meta": meta}


def write_reports(cfg: dict, runs: list[dict], meta: dict, out: Path, stem: str, plot_png: bool = True) -> list[dict]:
    """Summary CSV, runs CSV, markdown and PNG from a sweep's runs (also used by ``--from-json``)."""
    rows = report.summarise(runs)
    report.write_csv(out / f"{stem}.csv", rows)
    report.write_csv(out / f"{stem}_runs.csv", runs)
    md = report.markdown(rows, cfg, meta) + report.cost_line(meta, runs)
    (out / f"{stem}.md").write_text(md)
    if plot_png:
        report.plot(rows, out / f"{stem}.png", f"{meta['task_text'].split(' (')[0]}, {meta['model_text']}, "
                                               f"{meta['seeds']} seeds (mean ± std)")
    print(md)
    return rows


if __name__ == "__main__":
    main()
