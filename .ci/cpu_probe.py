"""Print which CPU kernels torch dispatches to in this environment; exit 1 if they are not the ones asked for.

``.ci/run`` re-runs the ``numerics`` tests with the dispatch forced down to other CPUs through environment variables.
A misspelt variable, or one a torch build ignores, would silently re-run the native kernels and prove nothing, so each
emulated pass starts with::

    python .ci/cpu_probe.py --expect avx2

which prints one line such as::

    CPU dispatch: ATen AVX2 (native AVX512) | oneDNN Intel AVX2 | MKL CNR:OFF | OpenBLAS Haswell

and exits 1 when ATen's capability (``torch.backends.cpu.get_cpu_capability()``) is not ``--expect``, or when a cap
set in the environment did not take effect: ``ONEDNN_MAX_CPU_ISA`` (checked against oneDNN's own ``isa:`` line),
``MKL_CBWR`` (MKL's verbose ``CNR:`` field) and ``OPENBLAS_CORETYPE`` (scipy's OpenBLAS, which runs the CSS QR).
``MKL_ENABLE_INSTRUCTIONS`` is passed through but cannot be checked: MKL reports no ISA, and the MKL inside the
torch wheels runs its AVX2 ("def") GEMM kernels even on AVX-512 machines, so capping it at AVX2 changes nothing.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

# what oneDNN prints on its "isa:" line for the ONEDNN_MAX_CPU_ISA values .ci/run uses
ONEDNN_ISA_NAMES = {"AVX2": "Intel AVX2", "SSE41": "Intel SSE4.1", "AVX512_CORE": "Intel AVX-512"}
CAP_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "OPENBLAS_CORETYPE")

# Runs in a child process: oneDNN and MKL print their verbose lines from C, on the process's stdout.
_CHILD = r"""
import torch
print("ATEN", torch.backends.cpu.get_cpu_capability(), flush=True)
x = torch.ones(2, 8, 16, 16)
torch.nn.functional.conv2d(x, torch.ones(8, 8, 3, 3))   # batch > 1: a oneDNN convolution
torch.ones(64, 64) @ torch.ones(64, 64)                   # an MKL SGEMM
try:
    import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS)
    from threadpoolctl import threadpool_info
    arch = sorted({d.get("architecture") or "?" for d in threadpool_info() if d.get("internal_api") == "openblas"})
    print("OPENBLAS", ",".join(arch) or "none", flush=True)
except ImportError:
    print("OPENBLAS unknown", flush=True)
"""


def probe(env: dict[str, str]) -> dict[str, str]:
    """ATen capability, oneDNN ISA, MKL CNR mode and OpenBLAS core type seen by a fresh python in ``env``."""
    env = dict(env, ONEDNN_VERBOSE="1", MKL_VERBOSE="1", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:       # not the repo root: no stray imports from the checkout
        out = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=tmp, capture_output=True, text=True,
                             timeout=300)
    if out.returncode != 0:
        sys.exit(f"cpu_probe: the probe process failed:\n{out.stderr[-2000:]}")
    text = out.stdout
    found = {
        "aten": re.search(r"^ATEN (\S+)", text, re.M),
        "onednn": re.search(r"onednn_verbose,[^\n]*isa:([^\n]+)", text),
        "mkl": re.search(r"MKL_VERBOSE SGEMM[^\n]*(CNR:\S+)", text),
        "openblas": re.search(r"^OPENBLAS (\S+)", text, re.M),
    }
    return {k: (m.group(1).strip() if m else "?") for k, m in found.items()}


def check(seen: dict[str, str], expect: str, env: dict[str, str]) -> list[str]:
    """The reasons this environment does not dispatch as asked (empty when it does)."""
    errors = []
    if seen["aten"].upper() != expect.upper():
        errors.append(f"ATen capability is {seen['aten']}, expected {expect.upper()}"
                      f" (ATEN_CPU_CAPABILITY={env.get('ATEN_CPU_CAPABILITY')!r})")
    isa = env.get("ONEDNN_MAX_CPU_ISA")
    if isa and ONEDNN_ISA_NAMES.get(isa.upper(), isa) not in seen["onednn"]:
        errors.append(f"oneDNN runs {seen['onednn']!r} although ONEDNN_MAX_CPU_ISA={isa}")
    cbwr = env.get("MKL_CBWR")
    if cbwr and seen["mkl"] != f"CNR:{cbwr.upper()}":
        errors.append(f"MKL reports {seen['mkl']} although MKL_CBWR={cbwr}")
    core = env.get("OPENBLAS_CORETYPE")
    if core and seen["openblas"] != "unknown" and seen["openblas"].lower() != core.lower():
        errors.append(f"scipy's OpenBLAS runs {seen['openblas']} although OPENBLAS_CORETYPE={core}")
    return errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--expect", required=True, type=str.upper, choices=("DEFAULT", "AVX2", "AVX512"),
                   help="the ATen CPU capability this environment must dispatch to")
    args = p.parse_args(argv)
    env = dict(os.environ)
    native_env = {k: v for k, v in env.items() if k not in CAP_VARS}
    seen, native = probe(env), probe(native_env)
    caps = " ".join(f"{k}={env[k]}" for k in CAP_VARS if k in env) or "(none)"
    print(f"CPU dispatch: ATen {seen['aten']} (native {native['aten']}) | oneDNN {seen['onednn']} | "
          f"MKL {seen['mkl']} | OpenBLAS {seen['openblas']}  [caps: {caps}]")
    errors = check(seen, args.expect, env)
    for e in errors:
        print(f"cpu_probe: {e}", file=sys.stderr)
    if not errors and seen == native:
        print("cpu_probe: note: this is the native dispatch, so this pass re-runs the native kernels")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
