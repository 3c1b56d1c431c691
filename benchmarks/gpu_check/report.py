"""gpu_check's Markdown report: one table per section, every speed figure as a ratio to dense from the same run."""
from __future__ import annotations


def _f(x, fmt: str = ".2f", suffix: str = "") -> str:
    try:
        return format(float(x), fmt) + suffix
    except (TypeError, ValueError):
        return "—"


def env_md(env: dict) -> list[str]:
    keys = ("card", "capability", "memory_gib", "driver", "cuda_runtime", "cudnn", "torch", "torchvision", "cpu",
            "cpu_count", "torch_threads")
    return ["| " + " | ".join(k for k in keys if k in env) + " |", "|" + "---|" * sum(k in env for k in keys),
            "| " + " | ".join(str(env[k]) for k in keys if k in env) + " |"]


def train_md(t: dict) -> list[str]:
    out = [f"ResNet-50 training step, {t['image_size']} px, batch {t['batch']}, AMP ({t['dtype']}, static loss scale) "
           "+ channels_last, medians:", "",
           "| config | density | step (ms) | images/s | step vs dense | MACs vs dense |", "|---|---|---|---|---|---|"]
    for r in t["rows"]:
        out.append(f"| {r['config']} | {r['density']:.2f} | {1e3 * r['step_s']:.1f} | {r['images_per_s']:.0f} | "
                   f"{r['vs_dense']:.2f}× | {r['macs_vs_dense']:.2f}× |")
    p, ev = t["projection"], t["event_s"]
    out += ["", f"Mask re-application: {1e3 * t['mask_reapply_s']:.2f} ms = "
                f"{100 * t['mask_reapply_share_of_dense_step']:.2f} % of a dense step. One prune/regrow event: masked "
                f"{ev['masked']:.2f} s, compact {ev['compact']:.2f} s "
                f"({100 * t['event_share_of_epoch']['compact']:.3f} % of a dense ImageNet epoch).",
            f"Projected whole recipe ({p['recipe']['epochs']} epochs, ΔT {p['recipe']['delta_t']}, T_max "
            f"{p['recipe']['t_max']}, S {p['recipe']['sparsity']}, δ0 {p['recipe']['delta0']}, "
            f"{p['recipe']['events']} events): masked / dense **{p['masked_vs_dense']:.3f}×**, compact / dense "
            f"**{p['compact_vs_dense']:.3f}×** (mean density {p['mean_density']:.3f}; dense run "
            f"{p['dense_run_gpu_hours']:.1f} GPU-hours on this card)."]
    return out


def infer_md(r: dict) -> list[str]:
    cols = [f"{v}_b{b}" for b in r["batches"] for v in ("eager", "compile")]
    src = r["widths"]
    out = [f"Compact inference ({r['dtype']}, channels_last; compile backend {r['compile_backend']}); widths from "
           f"`{src['source']}`. Cells: ms per batch (speed-up vs dense in the same variant and batch).", "",
           "| model | G MACs | FLOPs ratio | params (M) | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
           "|" + "---|" * (4 + len(cols))]
    for m in r["models"]:
        cells = [f"{m['ms'][c]:.2f} ({m['speedup'].get(c, float('nan')):.2f}×)" if c in m["ms"] else "skipped"
                 for c in cols]
        out.append(f"| {m['model']} | {m['macs'] / 1e9:.3f} | {m['flops_ratio']:.2f}× | {m['params'] / 1e6:.2f} | "
                   + " | ".join(cells) + " |")
    rounded = [m for m in r["models"] if "vs_unrounded" in m]
    if rounded:
        out += ["", "Rounding widths up to multiples of 8 (time of the unrounded model / time of the rounded one): "
                + "; ".join(f"{m['model']}: " + ", ".join(f"{k.replace('_', ' ')} {v:.2f}×"
                                                         for k, v in m["vs_unrounded"].items()) for m in rounded)]
    if r["compile_skipped_for_time"]:
        out += ["", f"torch.compile skipped for lack of time: {', '.join(r['compile_skipped_for_time'])}."]
    if r["compile_s"]:
        out += ["", "Compile times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["compile_s"].items()) + "."]
    return out


def detseg_md(d: dict) -> list[str]:
    out = ["| task | model | batch | image | losses | events (step: density) | scaler scale | skipped | "
           "s / iteration | ok |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in d["tasks"]:
        out.append(f"| {t['task']} | {t['model']} | {t['batch']} | {t['image_size']} | "
                   + ", ".join(f"{v:.2f}" for v in t["losses"]) + " | "
                   + ", ".join(f"{e['step']}: {e['density']:.3f}" for e in t["events"]) + f" | {t['scale']:g} | "
                   f"{t['skipped_steps']} | {_f(sorted(t['iteration_s'])[len(t['iteration_s']) // 2] if t['iteration_s'] else None)} | "
                   f"{'yes' if t['ok'] else 'NO: ' + '; '.join(t['problems'])} |")
    return out


def amp_md(a: dict) -> list[str]:
    out = ["| path | skipped / injected | scale per step | ok |", "|---|---|---|---|"]
    for p in a["paths"]:
        inj = sum(s["injected"] for s in p["steps"])
        scales = " → ".join(f"{s['scale_after']:g}" for s in p["steps"])
        bad = [x for x in a["problems"] if x.startswith(p["mode"])]
        out.append(f"| {p['mode']} | {p['skipped_steps']} / {inj} | {scales} | {'yes' if not bad else 'NO'} |")
    return out


def dali_md(d: dict) -> list[str]:
    out = [f"{d['folder']['images']} generated {d['image_wh'][0]}×{d['image_wh'][1]} JPEGs (mean "
           f"{d['folder']['mean_kb']} KB), batch {d['batch']}, {d['threads']} DALI threads / DataLoader workers.", "",
           "| backend | split | images/s | vs pytorch |", "|---|---|---|---|"]
    for r in d["rows"]:
        out.append(f"| {r['backend']} | {r['split']} | {r['images_per_s']:.0f} | {_f(r.get('per_s_vs_pytorch'), '.2f', '×')} |")
    for b, why in d["skipped"].items():
        out.append(f"| {b} | — | skipped: {why} | — |")
    return out


TITLES = {"amp": ("Loss scaling (injected fp16 overflow)", amp_md), "detseg": ("DET and SEG with AMP and one CHEX event",
                                                                              detseg_md),
          "train": ("CLS training: dense vs masked vs compact", train_md),
          "infer": ("Compact inference", infer_md), "dali": ("Input pipeline", dali_md)}


def markdown(result: dict) -> str:
    env = result["env"]
    lines = [f"# gpu_check — {env.get('card')}", "", f"Command: `{result['command']}`; total {result['total_s']:.0f} s"
             f"{' (quick sizes: not representative)' if result['quick'] else ''}. Overall: "
             f"**{'all checks passed' if result['ok'] else 'PROBLEMS FOUND'}**.", ""] + env_md(env)
    for name, sec in result["sections"].items():
        title, fn = TITLES[name]
        lines += ["", f"## {title}", ""]
        if "error" in sec:
            lines.append(f"FAILED: {sec['error']}")
            continue
        lines += fn(sec)
        if sec.get("problems"):
            lines += ["", "Problems: " + "; ".join(sec["problems"])]
    return "\n".join(lines) + "\n"
