"""Two gloo processes with different data, and explorers seeded differently on purpose (so their local decisions
differ), end every exploration event with identical masks, MRU store, parameters, momentum and norm statistics — and
the comparison has teeth: without the mask broadcast (or the statistics sync) the same run diverges. A NaN on one rank
only stops both ranks with the same error."""
import datetime
import hashlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _scenario(rank: int, variant: str) -> list[dict]:
    from chex_core import ChannelExplorer, ExplorationSchedule, resnet_groups
    from conftest import tiny_bottleneck

    model = tiny_bottleneck(seed=0)
    # "residual": the coupled residual-stream groups (several producers/norms/consumers each) instead of shortcuts
    groups = resnet_groups(model, residual=True) if variant == "residual" else \
        resnet_groups(model, include_downsample=True)
    # a different exploration seed per rank: regrowth draws differ, so only the broadcast can make ranks agree
    ex = ChannelExplorer(model, groups, ExplorationSchedule(1, 4, 0.5, 0.3, steps_per_unit=2), seed=11 + rank)
    if variant == "no_mask_broadcast":
        ex._broadcast_masks = lambda: None
    elif variant == "no_stats_sync":
        ex._sync_norm_buffers = lambda: None
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    ex.start(opt)
    g = torch.Generator().manual_seed(1000 + rank)          # different data (and augmentation) per rank on purpose
    norms = [model.get_submodule(n) for gr in groups for n in gr.norms]
    digests = []
    for step in range(1, 10):
        x = torch.randn(6, 3, 16, 16, generator=g)
        y = torch.randint(0, 10, (6,), generator=g)
        loss = nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ex.after_step(step, opt) is not None:
            digests.append({
                "step": step,
                "masks": _digest(ex.masks[k] for k in sorted(ex.masks)),
                "mru": _digest(v for k in sorted(ex.mru) for _, v in sorted(ex.mru[k].items())),
                "params": _digest(model.parameters()),
                "momentum": _digest(opt.state[p]["momentum_buffer"] for p in model.parameters()),
                "norm_stats": _digest(t for n in norms for t in (n.running_mean, n.running_var)),
            })
    return digests


def _nan_on_one_rank(rank: int) -> str:
    from chex_core import ChannelExplorer, ExplorationSchedule, resnet_groups
    from conftest import tiny_bottleneck

    model = tiny_bottleneck(seed=0)
    ex = ChannelExplorer(model, resnet_groups(model), ExplorationSchedule(1, 4, 0.5, 0.3))
    ex.start()
    if rank == 1:
        model.layer2[0].bn1.running_var[0] = float("nan")
    try:
        ex.explore(1)
    except Exception as e:        # noqa: BLE001 — what each rank raised is the result
        return f"{type(e).__name__}: {e}"
    return "no error"


def _worker(rank, world, init_file, out_dir):
    os.environ.update(OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    result = {v: _scenario(rank, v) for v in ("broadcast", "residual", "no_mask_broadcast", "no_stats_sync")}
    result["nan"] = _nan_on_one_rank(rank)
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        torch.save(gathered, os.path.join(out_dir, "digests.pt"))
    # no rank may tear gloo down while the other still has a collective in flight (that aborts the process)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_agree_after_every_event(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    a, b = torch.load(tmp_path / "digests.pt", weights_only=False)
    assert [d["step"] for d in a["broadcast"]] == [2, 4, 6, 8]
    for da, db in zip(a["broadcast"], b["broadcast"]):
        assert da == db, f"ranks differ after the event at step {da['step']}"
    assert [d["step"] for d in a["residual"]] == [2, 4, 6, 8]
    for da, db in zip(a["residual"], b["residual"]):      # coupled residual groups (issue 18)
        assert da == db, f"residual groups: ranks differ after the event at step {da['step']}"
    # negative controls: the same run without the mask broadcast, or without the statistics sync, diverges
    assert any(da["masks"] != db["masks"] for da, db in zip(a["no_mask_broadcast"], b["no_mask_broadcast"]))
    assert any(da["params"] != db["params"] for da, db in zip(a["no_mask_broadcast"], b["no_mask_broadcast"]))
    assert any(da["norm_stats"] != db["norm_stats"] for da, db in zip(a["no_stats_sync"], b["no_stats_sync"]))
    # a NaN on rank 1 only: both ranks raise the same error at the same event, none hangs
    assert a["nan"] == b["nan"] and a["nan"].startswith("NonFiniteWeightError") and "layer2.0.bn1.running_var" \
        in a["nan"], (a["nan"], b["nan"])
