"""Process setup shared by every task: one-line user errors, logging, distributed init and seeding, RNG capture.

Seeding policy (the same in CLS, DET and SEG):

- one *run seed*: ``--seed``, or a random one drawn on rank 0 and broadcast, so every rank agrees on it;
- the exploration seed (``--chex-seed``) defaults to the run seed, so CHEX decisions agree across ranks;
- each rank seeds its global generators (torch, Python ``random``, numpy) with ``seed + rank``: augmentation and
  mixup draws differ between ranks, as in the NVIDIA recipes. Model initialisation therefore differs too, which is
  why the harness broadcasts rank 0's weights before training starts (see ``chex_tasks.harness.run``).

The RNG state of every rank goes into each checkpoint (:func:`capture_rng`), so a resumed run continues each rank's
streams exactly; a checkpoint written by another number of processes keeps the fresh streams and says so.
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from chex_core import distributed as dist_utils
from chex_core.checkpoint import capture_rng_state, restore_rng_state

__all__ = ["UserError", "OneLineParser", "require_at_least", "one_line", "setup_logging", "Runtime", "start_runtime",
           "capture_rng", "restore_rng"]

log = logging.getLogger("chex_tasks.harness")


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors as a single ``prog: error: ...`` line (a usage block of 70 flags would bury it)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def require_at_least(parser: argparse.ArgumentParser, *checks: tuple[str, float | None, float]) -> None:
    """One line naming the flag, exit 2, for the first ``(flag, value, minimum)`` whose value is below its minimum
    (``None`` = not given, not checked)."""
    for flag, value, low in checks:
        if value is not None and value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line. An error re-raised from a DataLoader worker carries the worker's whole
    traceback; its last line is the original ``Type: message``, of which the message is kept."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1]
    head, sep, rest = last.partition(": ")
    if len(lines) > 1 and sep and head.split(".")[-1].endswith(("Error", "Mismatch", "Exception")):
        return rest
    return last


def setup_logging(is_main: bool) -> None:
    """INFO on rank 0, warnings only elsewhere (one copy of each message is enough)."""
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, stream=sys.stdout,
                        format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S", force=True)
    if not is_main:
        warnings.filterwarnings("ignore")


@dataclass(frozen=True)
class Runtime:
    """Where this process runs and the run seed every rank agreed on."""

    info: dist_utils.DistInfo
    seed: int

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    @property
    def distributed(self) -> bool:
        return self.info.distributed


def _shared_seed(seed: int | None) -> int:
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
    return int(dist_utils.broadcast_object(seed))


def seed_rank(seed: int, rank: int) -> None:
    """Seed the global generators of this rank (``seed + rank``)."""
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)


def start_runtime(args: argparse.Namespace, device: str | None = None) -> Runtime:
    """Initialise the process group (torchrun environment or single process), logging and the seeds; writes the
    agreed seed back to ``args.seed`` and defaults ``args.chex_seed`` to it."""
    info = dist_utils.init_distributed(device=device)
    setup_logging(info.is_main)
    seed = _shared_seed(getattr(args, "seed", None))
    args.seed = seed
    if getattr(args, "chex_seed", None) is None:
        args.chex_seed = seed
    seed_rank(seed, info.rank)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    return Runtime(info, seed)


def capture_rng(cuda: bool = True) -> dict:
    """This process's global RNG states as tensors and plain containers (so a checkpoint holding them loads with
    ``torch.load(weights_only=True)``): torch CPU and CUDA (``chex_core.checkpoint.capture_rng_state``), Python
    ``random`` and numpy. ``cuda=False`` in data-loader workers, which must not initialise CUDA."""
    state = capture_rng_state() if cuda else {"torch": torch.get_rng_state()}
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["python"] = [version, list(words), gauss]
    state["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (keys that are absent are left alone)."""
    restore_rng_state(state)
    if "python" in state:
        version, words, gauss = state["python"]
        random.setstate((version, tuple(words), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def run_guarded(parser: argparse.ArgumentParser, body, *, user_errors: tuple = (), run_errors: tuple = ()) -> int:
    """Run an entry point's ``body()`` the same way in every task: a :class:`UserError` (or one of ``user_errors``)
    is one ``prog: error: ...`` line and exit status 2; one of ``run_errors`` (bad data, a non-finite loss...) is one
    logged line and status 1; the process group is torn down in every case."""
    try:
        result = body()
        return 0 if result is None else int(result)
    except (UserError, *user_errors) as exc:
        dist_utils.cleanup()
        parser.error(one_line(exc))
    except run_errors as exc:
        log.error("%s: %s", type(exc).__name__, one_line(exc))
        return 1
    finally:
        dist_utils.cleanup()
    return 1
