"""Compatibility launcher for upstream's ``python ./multiproc.py --nproc_per_node N ./main.py ARGS...``.

It is a thin shim over torch's elastic launcher (``torch.distributed.run``, i.e. ``torchrun``), which sets
``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` for every worker; all torchrun options are accepted (``--nnodes``,
``--node_rank``, ``--master_addr``, ``--master_port``, ``--rdzv_endpoint`` …). On a single node without an explicit
rendezvous it adds ``--standalone``, which picks a free port, so concurrent jobs on one machine do not collide on
port 29500. ``torchrun --nproc_per_node N CLS/main.py ARGS...`` is equivalent and the documented way.
"""
from __future__ import annotations

import sys

from torch.distributed import run as torchrun

_RENDEZVOUS_FLAGS = ("--standalone", "--master_addr", "--master-addr", "--master_port", "--master-port",
                     "--rdzv_endpoint", "--rdzv-endpoint", "--rdzv_backend", "--rdzv-backend")


def launcher_argv(argv: list[str]) -> list[str]:
    """torchrun's argv for upstream-style ``argv``; launcher options are the ones before the script path."""
    script_at = next((i for i, a in enumerate(argv) if a.endswith(".py") or a == "-m"), len(argv))
    launcher = argv[:script_at]
    multi_node = _value(launcher, "--nnodes") not in (None, "1", "1:1")
    explicit = any(a.split("=")[0] in _RENDEZVOUS_FLAGS for a in launcher)
    if not explicit and not multi_node:
        return ["--standalone", *argv]
    return list(argv)


def _value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> None:
    torchrun.main(launcher_argv(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
