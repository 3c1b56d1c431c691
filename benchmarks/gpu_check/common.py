"""What every gpu_check section shares: the run configuration, CUDA-event timing, the time budget, the environment.

Timing: on CUDA a measurement is the time between two CUDA events recorded around the work on the current stream
(after a ``synchronize`` so nothing earlier is counted); it includes host launch overhead whenever the GPU waits for
the host, as at batch 1. On CPU (``--device cpu``) the wall clock is used. Every reported figure is a median over
repetitions taken after warm-up, and configurations are interleaved round by round so that clock or load drift hits
them alike; ratios to dense come from the same run.
"""
from __future__ import annotations

import gc
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DEFAULT_WIDTHS = REPO / "benchmarks" / "widths" / "resnet50_digits.json"
SECTIONS = ("amp", "detseg", "train", "infer", "dali")


@dataclass
class Config:
    """Sizes of one gpu_check run. :func:`quick_cpu` shrinks them so the same code runs in seconds on a CPU."""

    device: torch.device
    quick: bool = False
    sections: tuple[str, ...] = SECTIONS
    widths: Path = DEFAULT_WIDTHS
    budgets: tuple[str, ...] = ()            # width-spec names to time (empty: all but the chex-res-* ones)
    out: Path = REPO / "benchmarks" / "results"
    time_budget_s: float = 420.0             # the whole run; compile jobs are cut first when it runs short
    # CLS training (ResNet-50, AMP + channels_last)
    image_size: int = 224
    max_batch: int = 256
    train_warmup: int = 3
    train_rounds: int = 3
    train_steps: int = 5                     # timed steps per configuration per round
    sparsity: float = 0.7
    delta0: float = 0.3
    densities: tuple[float, ...] = (0.6, 0.45, 0.3)   # the S = 0.7 schedule spans 1 - S + δ0 = 0.6 down to 0.3
    events: int = 2
    static_loss_scale: float = 128.0         # the recipe's --static-loss-scale
    # compact inference
    infer_batches: tuple[int, ...] = (1, 256)
    infer_warmup: int = 5
    infer_rounds: int = 3
    infer_iters: int = 10
    round_to: int = 8
    compile: bool = True
    compile_backend: str = "inductor"
    compile_models: int = 0                  # 0 = every model; else the first N (dense first)
    compile_batches: tuple[int, ...] = ()    # batch sizes compiled (empty: every infer batch)
    # DET / SEG / AMP health checks
    det_backbone: str = "resnet50"
    det_batch: int = 8
    seg_batch: int = 2
    seg_size: int = 800
    detseg_iters: int = 8                    # the event fires after half of them
    # input pipeline
    dali_images: int = 512
    dali_threads: int = 8
    dali_batch: int = 128
    amp_dtype: torch.dtype = torch.float16   # train/infer/detseg autocast (bf16 on CPU: fp16 CPU kernels crawl)
    scaler_dtype: torch.dtype = torch.float16  # the amp section: fp16 on every device, so the GradScaler path runs
    seed: int = 0
    extra: dict = field(default_factory=dict)


def quick_cpu(cfg: Config) -> Config:
    """Tiny sizes for CI: the same code paths (TrainStep, GradScaler with fp16, explorer events, compact rebuilds,
    torch.compile through Dynamo with the ``eager`` backend, DALI on CPU) in seconds."""
    cfg.image_size, cfg.max_batch, cfg.train_warmup, cfg.train_rounds, cfg.train_steps = 32, 2, 1, 1, 1
    cfg.densities, cfg.events = (0.45,), 1
    cfg.infer_batches, cfg.infer_warmup, cfg.infer_rounds, cfg.infer_iters = (1, 2), 1, 1, 1
    cfg.compile_backend, cfg.compile_models, cfg.compile_batches = "eager", 2, (2,)
    # batch 2: SSD's last extra block is 1×1, and BatchNorm needs more than one value per channel in training
    cfg.det_backbone, cfg.det_batch, cfg.seg_batch, cfg.seg_size, cfg.detseg_iters = "resnet18", 2, 1, 64, 2
    cfg.dali_images, cfg.dali_threads, cfg.dali_batch = 8, 1, 4
    return cfg


class Deadline:
    """The run's time budget: sections ask how much is left before starting optional work."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes: CUDA events on the current stream (GPU), wall clock (CPU)."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device: torch.device) -> dict:
    """Card and software versions the numbers belong to."""
    env = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda, "python": platform.python_version(),
           "platform": platform.platform(), "cpu_count": os.cpu_count(), "device": str(device)}
    try:
        import torchvision
        env["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(card=props.name, capability=f"{props.major}.{props.minor}", memory_gib=round(
            props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(), driver=_driver_version())
    else:
        env.update(card="cpu", cpu=_cpu_name(), torch_threads=torch.get_num_threads())
    return env


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.machine())
    except OSError:
        return platform.machine()


def card_slug(env: dict) -> str:
    """``NVIDIA H200`` → ``nvidia_h200`` (the results file name)."""
    return re.sub(r"[^a-z0-9]+", "_", str(env.get("card", "unknown")).lower()).strip("_") or "unknown"
