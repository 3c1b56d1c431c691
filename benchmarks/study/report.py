"""Tables, verdicts and plots of an accuracy-study sweep, computed from its runs alone (so ``--from-json`` can rebuild
them bit for bit).

Verdict rule: a CHEX arm "beats" / "loses to" another method only when the gap of the means exceeds both two standard
errors of the difference, ``2·sqrt(s₁²/n₁ + s₂²/n₂)``, and one validation image; otherwise the two "tie".
"""
from __future__ import annotations

import csv
import logging
import math
import statistics
from collections import defaultdict
from pathlib import Path

from .methods import ABLATIONS, CHEX_VARIANTS, LEGACY, STUDY

log = logging.getLogger("accuracy_study")

ORDER = ("dense", "chex", "chex-residual", "tp-l1-init", "tp-l1-half") + LEGACY + ABLATIONS
CHEX_ARMS = ("chex", "chex-residual")
RIVALS = ("tp-l1-init", "tp-l1-half") + LEGACY
assert set(ORDER) == set(STUDY) | set(LEGACY) | set(ABLATIONS) | set(CHEX_VARIANTS)


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (method, budget, epochs): mean ± std of top-1 over seeds, achieved MACs, cost."""
    cells = defaultdict(list)
    for r in runs:
        cells[(r["method"], r["budget"], r["epochs"])].append(r)
    rows = []
    for (m, b, e), rs in cells.items():
        accs = [r["val_top1"] for r in rs]
        fr = [r["macs"] / r["dense_macs"] for r in rs]
        rows.append({"method": m, "budget": b, "epochs": e, "n": len(rs), "top1_mean": statistics.mean(accs),
                     "top1_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "macs_mean": statistics.mean(r["macs"] for r in rs), "macs_frac_mean": statistics.mean(fr),
                     "macs_frac_min": min(fr),
                     "macs_frac_max": max(fr), "max_abs_macs_error": max(abs(r["macs_error"]) for r in rs),
                     "cpu_s_mean": statistics.mean(r["cpu_s"] for r in rs)})
    return sorted(rows, key=lambda r: (r["epochs"], -r["budget"], ORDER.index(r["method"])))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}" if x < 0.995 else f"{100 * x:.0f}"


def _cell(r: dict | None, n: int) -> str:
    """``mean ± std (achieved MACs)``, plus the number of seeds when it is not the table's ``n``."""
    if r is None:
        return "—"
    lo, hi = _pct(r["macs_frac_min"]), _pct(r["macs_frac_max"])
    seeds = "" if r["n"] == n else f", {r['n']} seed{'s' if r['n'] > 1 else ''}"
    return f"{r['top1_mean']:.2f} ± {r['top1_std']:.2f} ({lo}{'' if lo == hi else '–' + hi} %{seeds})"


def _table(cell: dict, methods, cols, key, head) -> list[str]:
    n = max(r["n"] for r in cell.values())
    lines = [f"| method | {' | '.join(head(c) for c in cols)} |", "|" + "---|" * (len(cols) + 1)]
    for m in methods:
        cs = [_cell(cell.get(key(m, c)), n) for c in cols]
        if any(c != "—" for c in cs):
            lines.append(f"| {m} | " + " | ".join(cs) + " |")
    return lines


def verdict(a: dict, b: dict, one_image: float) -> tuple[str, float, float]:
    """``(word, gap, noise)``; with a single seed on either side the spread is unknown: no verdict (noise = NaN)."""
    d = a["top1_mean"] - b["top1_mean"]
    if min(a["n"], b["n"]) < 2:
        return "cannot yet be compared with", d, float("nan")
    noise = max(2 * math.sqrt(a["top1_std"] ** 2 / a["n"] + b["top1_std"] ** 2 / b["n"]), one_image)
    return ("beats" if d > noise else "loses to" if -d > noise else "ties with"), d, noise


def verdict_lines(cell: dict, one_image: float) -> list[str]:
    out = []
    for (m, b, e) in sorted(k for k in cell if k[0] in CHEX_ARMS):
        parts = []
        for other in (("chex",) if m == "chex-residual" else ()) + RIVALS + ("dense",):
            o = cell.get((other, b if other != "dense" else 1.0, e))
            if o is not None and o is not cell[(m, b, e)]:
                v, d, noise = verdict(cell[(m, b, e)], o, one_image)
                spread = f" ± {noise:.2f}" if noise == noise else ", one seed"
                parts.append(f"{v} {other} ({d:+.2f}{spread})")
        if parts:
            out.append(f"- {m} at {100 * b:g} % MACs, {e} epochs: " + ", ".join(parts) + ".")
    return out


def markdown(rows: list[dict], cfg: dict, meta: dict) -> str:
    """The sweep as markdown: main table, training-length tables, ablations, verdicts, cost."""
    cell = {(r["method"], r["budget"], r["epochs"]): r for r in rows}
    epochs = sorted({r["epochs"] for r in rows})
    budgets = sorted({r["budget"] for r in rows if r["method"] != "dense"}, reverse=True)
    base = epochs[0]
    n = max(r["n"] for r in rows)
    out = [f"Val top-1 (%) on {meta['task_text']}, {meta['model_text']} ({meta['dense_macs'] / 1e6:.2f} M MACs "
           f"dense), mean ± std over {n} seeds (fewer where a cell says so); in brackets the MACs the runs achieved "
           "(% of dense, min–max over seeds; `chex_core.count_macs`). Every method trains the same epochs with the "
           "same optimiser.", ""]
    main_methods = [m for m in ORDER if m not in ABLATIONS]

    def key_b(m, b):
        return (m, 1.0 if m == "dense" else b, base)
    out += [f"**{base} epochs**, by MACs budget:", ""]
    out += _table(cell, main_methods, budgets, key_b, _budget_head)
    for b in budgets:
        long = [e for e in epochs if (("chex", b, e) in cell or ("tp-l1-init", b, e) in cell)]
        if len(long) < 2:
            continue
        out += ["", f"**Training length at {100 * b:g} % of dense MACs**, by epochs:", ""]
        out += _table(cell, main_methods, long, lambda m, e: (m, 1.0 if m == "dense" else b, e),
                      lambda e: f"{e} epochs")
    abl = [m for m in ABLATIONS if any(k[0] == m for k in cell)]
    if abl:
        out += ["", f"Ablations of CHEX ({base} epochs):", ""]
        out += _table(cell, ("chex",) + tuple(abl), budgets, key_b, _budget_head)
    one_image = 100.0 / meta["n_val"]
    out += ["", f"Each CHEX arm minus each alternative, in percentage points of top-1 (one validation image = "
            f"{one_image:.3f} pp). 'beats'/'loses to' only when the gap exceeds both two standard errors of the "
            "difference of the means, 2·sqrt(s₁²/n₁ + s₂²/n₂), and one validation image; otherwise 'ties with':", ""]
    out += verdict_lines(cell, one_image)
    return "\n".join(out) + "\n"


def _budget_head(b: float) -> str:
    return f"{100 * b:g} % MACs"


def cost_line(meta: dict, runs: list[dict]) -> str:
    m = meta["machine"]
    off = sum(abs(r["macs_error"]) > meta["flops_tol"] for r in runs if r["method"] != "dense")
    return (f"\nMeasured on: {m['cpu_count']}-core CPU ({m['platform']}), no GPU, torch {m['torch']}; "
            f"{meta['jobs']} worker(s) × {meta['threads_per_job']} thread(s), shared machine (1-min load average "
            f"{meta['loadavg_1m_before']} before / {meta['loadavg_1m_after']} after the last invocation). CPU time of "
            f"the {len(runs)} runs: {sum(r['cpu_s'] for r in runs) / 3600:.2f} h. Runs off their MACs budget by more "
            f"than ±{100 * meta['flops_tol']:.0f} %: {off}.\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def plot(rows: list[dict], path: Path, title: str) -> bool:
    """Accuracy vs MACs (one panel per training length) and, where the sweep has a training-length axis, accuracy vs
    epochs (one panel per budget) — mean ± std error bars. False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipping %s (pip install matplotlib)", path.name)
        return False
    epochs = sorted({r["epochs"] for r in rows})
    budgets = sorted({r["budget"] for r in rows if r["method"] != "dense"}, reverse=True)
    long_b = [b for b in budgets if len({r["epochs"] for r in rows if r["budget"] == b}) > 1]
    ncol = max(len(epochs), len(long_b))
    fig, axes = plt.subplots(2 if long_b else 1, ncol, figsize=(max(7.0, 4.6 * ncol), 4.0 * (2 if long_b else 1)),
                             squeeze=False)
    methods = [m for m in ORDER if m != "dense" and any(r["method"] == m for r in rows)]
    for j, e in enumerate(epochs):
        ax = axes[0][j]
        for i, m in enumerate(methods):
            rs = sorted((r for r in rows if r["method"] == m and r["epochs"] == e), key=lambda r: r["macs_mean"])
            nudge = 1 + 0.02 * (i - (len(methods) - 1) / 2)          # keep equal-MACs error bars apart
            if rs:
                ax.errorbar([nudge * 100 * r["macs_frac_mean"] for r in rs], [r["top1_mean"] for r in rs],
                            yerr=[r["top1_std"] for r in rs], marker="o", capsize=3, label=m)
        d = next((r for r in rows if r["method"] == "dense" and r["epochs"] == e), None)
        if d:
            ax.axhline(d["top1_mean"], color="k", ls="--", lw=1, label="dense")
        ax.set(xscale="log", xlabel="MACs, % of dense (log; points nudged apart)", ylabel="val top-1 (%)",
               title=f"{e} epochs")
        ax.set_xticks([100 * b for b in budgets], [f"{100 * b:g}" for b in budgets])
        ax.minorticks_off()
    for j, b in enumerate(long_b):
        ax = axes[1][j]
        for m in ["dense"] + methods:
            rs = sorted((r for r in rows if r["method"] == m and r["budget"] == (1.0 if m == "dense" else b)),
                        key=lambda r: r["epochs"])
            if len(rs) > 1:
                ax.errorbar([r["epochs"] for r in rs], [r["top1_mean"] for r in rs], yerr=[r["top1_std"] for r in rs],
                            marker="o", capsize=3, label=m, ls="--" if m == "dense" else "-",
                            color="k" if m == "dense" else None)
        ax.set(xscale="log", xlabel="epochs (log)", ylabel="val top-1 (%)", title=f"{100 * b:g} % of dense MACs")
        ax.set_xticks(epochs, [str(e) for e in epochs])
        ax.minorticks_off()
    for row in axes:
        for ax in row:
            if ax.has_data():
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
            else:
                ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
