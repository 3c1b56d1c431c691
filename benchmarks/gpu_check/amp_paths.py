"""The two loss-scale paths of ``--amp``: a static scale (``--static-loss-scale 128``) and a dynamic one.

Both go through the training code's own objects (``chex_core.engine.AmpConfig`` → ``GradScaler``, ``TrainStep``).
An fp16 gradient overflow is injected at one step (a gradient hook fills one weight's gradient with inf, as a real
overflow leaves it) and the check asserts what the recipe relies on:

  - that step is reported skipped and counted (``TrainStep.skipped_steps``), and the parameters do not move;
  - the steps before and after it are not skipped, and they do move the parameters;
  - static: the scale stays at S throughout; dynamic: the scale halves at the overflow and is otherwise unchanged
    (growth only every 2000 clean steps).
"""
from __future__ import annotations

import torch
from torch import nn

from chex_core.engine import AmpConfig, TrainStep

from .common import Config


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def run_path(cfg: Config, static: bool, inject_at: int | None = 2, steps: int = 4) -> dict:
    """Train ``steps`` steps with an overflow injected at step ``inject_at`` (1-based; None = no injection)."""
    device = cfg.device
    torch.manual_seed(cfg.seed)
    model = _tiny_net().to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scale = cfg.static_loss_scale if static else None
    amp = AmpConfig(enabled=True, device_type=device.type, static_loss_scale=scale, dtype=cfg.scaler_dtype)
    scaler = amp.make_scaler()
    trainer = TrainStep(opt, scaler=scaler, static_loss_scale=scale)
    poison = {"on": False}
    model[0].weight.register_hook(lambda g: torch.full_like(g, float("inf")) if poison["on"] else g)
    x = torch.randn(4, 3, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4,), device=device)
    log = []
    for i in range(1, steps + 1):
        poison["on"] = i == inject_at
        before = [p.detach().clone() for p in model.parameters()]
        scale_before = scaler.get_scale()
        with amp.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        r = trainer({"loss": loss})
        moved = any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
        log.append({"step": i, "injected": i == inject_at, "skipped": r.skipped, "moved": moved,
                    "scale_before": scale_before, "scale_after": scaler.get_scale(), "loss": r.losses["loss"]})
    return {"mode": "static" if static else "dynamic", "scaler_enabled": scaler.is_enabled(),
            "skipped_steps": trainer.skipped_steps, "steps": log}


def problems(result: dict, cfg: Config) -> list[str]:
    """What is wrong with one path's log (empty = the path behaves as the recipe needs)."""
    out = []
    if not result["scaler_enabled"]:
        out.append("GradScaler is disabled (fp16 autocast should enable it)")
    injected = [s for s in result["steps"] if s["injected"]]
    if result["skipped_steps"] != len(injected):
        out.append(f"{result['skipped_steps']} skipped steps counted, {len(injected)} overflow(s) injected")
    for s in result["steps"]:
        if s["skipped"] != s["injected"]:
            out.append(f"step {s['step']}: skipped={s['skipped']} but injected={s['injected']}")
        if s["moved"] == s["injected"]:
            out.append(f"step {s['step']}: parameters {'moved' if s['moved'] else 'did not move'}")
        if result["mode"] == "static":
            if s["scale_after"] != cfg.static_loss_scale:
                out.append(f"step {s['step']}: static scale {s['scale_after']} != {cfg.static_loss_scale}")
        else:
            want = s["scale_before"] * (0.5 if s["injected"] else 1.0)
            if s["scale_after"] != want:
                out.append(f"step {s['step']}: dynamic scale {s['scale_before']} -> {s['scale_after']}, want {want}")
    return out


def run(cfg: Config, deadline=None) -> dict:
    results = [run_path(cfg, static) for static in (True, False)]
    probs = [f"{r['mode']}: {p}" for r in results for p in problems(r, cfg)]
    return {"ok": not probs, "problems": probs, "paths": results, "dtype": str(cfg.scaler_dtype)}
