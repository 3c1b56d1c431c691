"""Multi-node launch path on CPU: two gloo processes on localhost through torchrun's c10d rendezvous (the backend a
real multi-node job uses), both launched directly and through scripts/slurm_multinode.sh with stub srun/scontrol.
Each rank runs chex_core.distributed.init_distributed and collectives, and reports what it saw."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 120  # a hung rendezvous or collective must fail the test, never hang CI

PAYLOAD = textwrap.dedent('''
    import json, os, sys
    import torch
    from chex_core import distributed as D

    info = D.init_distributed(backend="gloo", device="cpu", timeout_s=60)
    total = torch.tensor([float(info.rank + 1)])
    torch.distributed.all_reduce(total)                        # 1 + 2 = 3 on every rank
    mean = D.all_reduce_mean(torch.tensor([2.0 * info.rank]))  # (0 + 2) / 2 = 1
    token = D.broadcast_object({"from": info.rank, "secret": 1234} if info.rank == 0 else None)
    ranks = D.all_gather_object(info.rank)
    out = {"rank": info.rank, "local_rank": info.local_rank, "world": info.world_size,
           "distributed": info.distributed, "backend": torch.distributed.get_backend(), "sum": total.item(),
           "mean": mean.item(), "token": token, "ranks": ranks, "run_id": os.environ.get("TORCHELASTIC_RUN_ID")}
    with open(os.path.join(sys.argv[1], f"rank{info.rank}.json"), "w") as f:
        json.dump(out, f)
    D.barrier()
    D.cleanup()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    env.update(extra or {})
    return env


def _check_ranks(out_dir, run_id: str) -> None:
    results = []
    for r in (0, 1):
        path = out_dir / f"rank{r}.json"
        assert path.is_file(), f"rank {r} wrote no result"
        results.append(json.loads(path.read_text()))
    for r, res in enumerate(results):
        assert res["rank"] == r and res["local_rank"] == r and res["world"] == 2 and res["distributed"]
        assert res["backend"] == "gloo"
        assert res["sum"] == 3.0 and res["mean"] == 1.0
        assert res["token"] == {"from": 0, "secret": 1234}
        assert res["ranks"] == [0, 1]
        assert res["run_id"] == run_id


def _run(cmd: list[str], env: dict, cwd: str) -> subprocess.CompletedProcess:
    try:
        out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:  # subprocess.run kills the launcher; its workers die with it
        pytest.fail(f"launcher hung for {TIMEOUT_S}s: {e.stderr[-2000:] if e.stderr else ''}")
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_torchrun_c10d_rendezvous_two_gloo_ranks(tmp_path):
    payload = tmp_path / "payload.py"
    payload.write_text(PAYLOAD)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--rdzv_id", "chex-test", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}",
           "--max_restarts", "0", str(payload), str(out_dir)]
    _run(cmd, _env(), str(tmp_path))
    _check_ranks(out_dir, "chex-test")


def _stub(path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.slow
def test_slurm_script_launches_torchrun_c10d(tmp_path):
    """scripts/slurm_multinode.sh end to end on one 'node': stub scontrol names 127.0.0.1 as the first node, stub
    srun runs its command once (one task per node), stub torchrun is this interpreter's torch.distributed.run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    _stub(bin_dir / "scontrol", f'echo "scontrol $*" >> {calls}\necho 127.0.0.1\necho node-b')
    _stub(bin_dir / "srun", f'echo "srun $*" >> {calls}\nexec "${{@:2}}"')  # drop --kill-on-bad-exit=1
    _stub(bin_dir / "torchrun", f'echo "torchrun $*" >> {calls}\nexec {sys.executable} -m torch.distributed.run "$@"')
    payload = tmp_path / "payload.py"
    payload.write_text(PAYLOAD)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = _env({"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_NNODES": "1",
                "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_ID": "4242", "GPUS_PER_NODE": "2",
                "MASTER_PORT": str(_free_port()), "CHEX_ROOT": ROOT, "OMP_NUM_THREADS": "1"})
    out = _run(["bash", os.path.join(ROOT, "scripts", "slurm_multinode.sh"), str(payload), str(out_dir)], env,
               str(tmp_path))
    _check_ranks(out_dir, "4242")
    log = calls.read_text()
    assert "scontrol show hostnames node-[a-b]" in log
    assert "srun --kill-on-bad-exit=1 torchrun" in log
    launched = next(line for line in log.splitlines() if line.startswith("torchrun "))
    assert "--nnodes 1 --nproc_per_node 2" in launched
    assert "--rdzv_backend c10d" in launched and f"--rdzv_endpoint 127.0.0.1:{env['MASTER_PORT']}" in launched
    assert "rendezvous 127.0.0.1" in out.stderr


def test_slurm_script_outside_slurm_fails_clearly(tmp_path):
    env = _env()
    env.pop("SLURM_NNODES", None)
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "slurm_multinode.sh")], env=env, cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "not inside a Slurm allocation" in out.stderr
