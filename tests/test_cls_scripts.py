"""Every ImageNet-table launch script runs the upstream recipe through torchrun with flags CLS accepts, and its
channel sparsity puts a uniformly pruned random-init model on the row's FLOPs figure (within 3 %). Without torchrun
on PATH the scripts launch ``$PYTHON -m torch.distributed.run`` instead (scripts/launcher.sh)."""
import os
import pathlib
import re
import shutil
import subprocess

import pytest
import torchvision

from chex_core import ChannelExplorer, ExplorationSchedule, count_macs, resnet_groups
from chex_core.cli import validate_chex_args
from CLS import main as cls_main

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("cls_resnet*gflops.sh"))


def launched_argv(script, tmp_path):
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "torchrun").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    (stub / "torchrun").chmod(0o755)
    env = {**os.environ, "PATH": f"{stub}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(script), "/data/imagenet"], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout.splitlines()


def test_without_torchrun_on_path_the_python_module_launches(tmp_path):
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "python3.x").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')   # prints what it would run
    (stub / "python3.x").chmod(0o755)
    system = {os.path.dirname(shutil.which(tool)) for tool in ("bash", "dirname", "env")}
    env = {**os.environ, "PATH": os.pathsep.join([str(stub), *system]), "PYTHON": "python3.x"}
    out = subprocess.run(["bash", str(SCRIPTS[0]), "/data/imagenet"], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    argv = out.stdout.splitlines()
    assert argv[:4] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"], argv[:6]


def test_one_script_per_upstream_row():
    assert len(SCRIPTS) == 8


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_script_launches_the_recipe_at_its_flops(script, tmp_path):
    argv = launched_argv(script, tmp_path)
    assert argv[:3] == ["--standalone", "--nproc_per_node", "8"] and argv[3].endswith("CLS/main.py")
    parser = cls_main.build_parser()
    args = parser.parse_args(argv[4:])
    validate_chex_args(parser, args)      # (check_args would also insist that /data/imagenet exists)
    assert args.grow_prune and args.amp and args.epochs == 250 and args.T_max == 180
    target = float(re.search(r"_(\d+(?:\.\d+)?)gflops", script.stem).group(1)) * 1e9
    model = getattr(torchvision.models, args.arch)()
    groups = resnet_groups(model)
    ex = ChannelExplorer(model, groups, ExplorationSchedule(1, 1, args.channel_sparsity, 0.0))
    ex.start()                                   # uniform S on the random init, as the scripts' headers say
    assert count_macs(model) == pytest.approx(target, rel=0.03)
