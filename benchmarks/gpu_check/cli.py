"""Command line of gpu_check: parse, run the sections within the time budget, write the report.

Each section runs in its own ``try``: a failure is recorded (type, message, where) and the others still run, so one
run on a borrowed GPU reports everything it can. The exit status is 0 when every check passed, 1 otherwise, 2 for a
usage error.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from . import amp_paths, dali_feed, detseg, infer, train_cls
from .common import DEFAULT_WIDTHS, REPO, SECTIONS, Config, Deadline, card_slug, environment, quick_cpu
from .report import markdown

RUNNERS = {"amp": amp_paths.run, "detseg": detseg.run, "train": train_cls.run, "infer": infer.run,
           "dali": dali_feed.run}


def build_parser() -> argparse.ArgumentParser:
    from . import __doc__ as doc
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="where to run (default cuda; cpu is for the --quick smoke run)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (32 px, batch 2, 1-2 iterations, compile with the 'eager' backend): the same code "
                        "paths in seconds; numbers are not representative")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS),
                   help="sections to run, in this order (default: all)")
    p.add_argument("--widths", type=Path, default=DEFAULT_WIDTHS,
                   help="width-spec JSON for the compact models (default %(default)s)")
    p.add_argument("--budgets", nargs="+", default=None, metavar="NAME",
                   help="width-spec names to time (default: all in --widths)")
    p.add_argument("--max-batch", type=int, default=None, help="largest training batch tried (default 256)")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="seconds for the whole run; compile jobs are skipped first when short (default 420)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile timings")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor; eager with --quick)")
    p.add_argument("--round-to", type=int, default=8, help="also time widths rounded up to multiples of N (default 8; "
                                                           "1 = off)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                   help="folder for gpu_<card>.{md,json} (default %(default)s)")
    return p


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Config:
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU (for the CPU smoke run use --device cpu --quick)")
    if args.round_to < 1:
        parser.error(f"--round-to must be >= 1, got {args.round_to}")
    for name, value in (("--max-batch", args.max_batch), ("--time-budget", args.time_budget)):
        if value is not None and value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    if not args.widths.is_file() and ("infer" in args.sections):
        parser.error(f"--widths: no such file {args.widths}")
    cfg = Config(device=torch.device(args.device), quick=args.quick, sections=tuple(args.sections),
                 widths=args.widths, out=args.out, round_to=args.round_to, compile=args.compile)
    if args.quick:
        quick_cpu(cfg)
    if args.device == "cpu":
        cfg.amp_dtype = torch.bfloat16        # as --amp on CPU; the amp section keeps fp16 (cfg.scaler_dtype)
    if args.budgets:
        cfg.budgets = tuple(args.budgets)
    elif args.quick:
        cfg.budgets = ("chex-1G",)
    if args.max_batch is not None:
        cfg.max_batch = args.max_batch
    if args.time_budget is not None:
        cfg.time_budget_s = args.time_budget
    if args.compile_backend:
        cfg.compile_backend = args.compile_backend
    return cfg


def run_sections(cfg: Config) -> dict:
    deadline = Deadline(cfg.time_budget_s)
    if cfg.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    sections = {}
    for name in cfg.sections:
        t = time.perf_counter()
        try:
            sections[name] = RUNNERS[name](cfg, deadline)
        except Exception as exc:                      # noqa: BLE001 — record it, run the other sections
            where = traceback.extract_tb(exc.__traceback__)[-1]
            sections[name] = {"ok": False, "problems": [], "error": f"{type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''} "
                              f"({Path(where.filename).name}:{where.lineno})"}
        sections[name]["seconds"] = round(time.perf_counter() - t, 1)
        state = "ok" if sections[name]["ok"] else "PROBLEMS"
        print(f"[gpu_check] {name}: {state} ({sections[name]['seconds']} s)", flush=True)
    return sections


@contextlib.contextmanager
def _quick_threads(quick: bool):
    """One compute thread for the --quick smoke run, restored afterwards: on a shared CI machine, multi-threaded
    BLAS/LAPACK calls (the CSS in every CHEX event) spin-wait for busy cores and take 5–20× longer."""
    if not quick:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits        # scikit-learn's dependency; scipy's BLAS threads
    except ImportError:
        threadpool_limits = contextlib.nullcontext
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(n)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(parser, args)
    t0 = time.perf_counter()
    with _quick_threads(cfg.quick):
        env = environment(cfg.device)
        sections = run_sections(cfg)
    result = {"command": "python -m benchmarks.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:]),
              "quick": cfg.quick, "env": env, "total_s": time.perf_counter() - t0,
              "ok": all(s["ok"] for s in sections.values()), "sections": sections,
              "config": {k: str(v) for k, v in dataclasses.asdict(cfg).items()}}
    stem = f"gpu_{card_slug(env)}" + ("_quick" if cfg.quick else "")
    cfg.out.mkdir(parents=True, exist_ok=True)
    md = markdown(result)
    (cfg.out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (cfg.out / f"{stem}.md").write_text(md)
    print(md)
    print(f"[gpu_check] wrote {cfg.out / stem}.{{md,json}}; {'all checks passed' if result['ok'] else 'PROBLEMS'}")
    return 0 if result["ok"] else 1
