"""Two gloo processes with different data end every exploration event with identical masks, MRU store and params."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))


def _worker(rank, world, init_file, out_dir):
    os.environ.update(OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from chex_core import ChannelExplorer, ExplorationSchedule, resnet_groups
    from conftest import tiny_bottleneck

    model = tiny_bottleneck(seed=0)
    groups = resnet_groups(model, include_downsample=True)
    ex = ChannelExplorer(model, groups, ExplorationSchedule(1, 4, 0.5, 0.3, steps_per_unit=2), seed=11)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    ex.start(opt)
    g = torch.Generator().manual_seed(1000 + rank)          # different data (and augmentation) per rank on purpose
    digests = []
    for step in range(1, 10):
        x = torch.randn(6, 3, 16, 16, generator=g)
        y = torch.randint(0, 10, (6,), generator=g)
        loss = nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rep = ex.after_step(step, opt)
        if rep is not None:
            masks = torch.cat([ex.masks[k] for k in sorted(ex.masks)]).float()
            mru = sum(float(v.double().sum()) for e in ex.mru.values() for v in e.values())
            params = sum(float(p.detach().double().sum()) for p in model.parameters())
            digests.append((step, masks.tolist(), mru, params))
    gathered = [None] * world
    dist.all_gather_object(gathered, digests)
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
    assert len(a) == 4 and [d[0] for d in a] == [2, 4, 6, 8]
    for da, db in zip(a, b):
        assert da[1] == db[1]                       # masks
        assert da[2] == db[2]                       # MRU store checksum
        assert da[3] == db[3]                       # parameter checksum
