"""Shared fixtures: tiny torchvision-style ResNets (same module names as torchvision) for fast CPU tests; and the
CPU/GPU split of the suite.

Every test checks CPU semantics, also on a machine with a GPU: code under test picks CUDA whenever
``torch.cuda.is_available()``, so an unhidden GPU would silently test other kernels (TF32, cuDNN) and other code paths
(fp16 + GradScaler instead of bf16). So CUDA is hidden for the whole session, twice over:

- in this process, ``torch.cuda.is_available`` / ``device_count`` (and ``torch.accelerator``'s) are patched: CUDA may
  already be initialised here (by a ``gpu`` test), after which ``CUDA_VISIBLE_DEVICES`` no longer has any effect;
- for child processes (CLI, torchrun, ``mp.spawn`` tests), ``CUDA_VISIBLE_DEVICES`` is set to the empty string, which
  they inherit.

Tests marked ``gpu`` get the real functions and the user's ``CUDA_VISIBLE_DEVICES`` back for their duration, and are
skipped with the reason when torch sees no GPU.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

_NO_CUDA = {"is_available": lambda: False, "device_count": lambda: 0}
_NO_ACCELERATOR = {"is_available": lambda: False, "device_count": lambda: 0,
                   "current_accelerator": lambda *args, **kwargs: None}


class _CudaHider:
    """Hides CUDA from this process and its children; ``reveal()`` undoes it for one ``gpu`` test."""

    def __init__(self) -> None:
        self.patch: pytest.MonkeyPatch | None = None

    def hide(self) -> None:
        if self.patch is not None:
            return
        self.patch = pytest.MonkeyPatch()
        self.patch.setenv("CUDA_VISIBLE_DEVICES", "")
        for name, fake in _NO_CUDA.items():
            self.patch.setattr(torch.cuda, name, fake)
        accelerator = getattr(torch, "accelerator", None)
        for name, fake in _NO_ACCELERATOR.items():
            if accelerator is not None and hasattr(accelerator, name):
                self.patch.setattr(accelerator, name, fake)

    def reveal(self) -> None:
        if self.patch is not None:
            self.patch.undo()
            self.patch = None


_HIDER = _CudaHider()


def pytest_configure(config):
    _HIDER.hide()           # before collection: test modules may ask torch.cuda at import time


def pytest_unconfigure(config):
    _HIDER.reveal()


def _gate(item, hider: _CudaHider) -> None:
    """CPU tests: CUDA hidden. ``gpu`` tests: CUDA as the machine has it, or a skip that says why."""
    if item.get_closest_marker("gpu") is None:
        hider.hide()
        return
    hider.reveal()
    if not torch.cuda.is_available():
        why = ("needs a CUDA GPU: torch.cuda.is_available() is False "
               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}, "
               f"torch {torch.__version__}, CUDA build {torch.version.cuda})")
        hider.hide()
        pytest.skip(why)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _gate(item, _HIDER)     # tryfirst: before any fixture of the test is set up


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    _HIDER.hide()           # after the gpu test's own fixtures are torn down


class TinyResNet(nn.Module):
    """torchvision's ResNet layout (conv1, bn1, layer1..4, fc) with small widths and a 3x3 stem for 16-32 px inputs."""

    def __init__(self, block=BasicBlock, layers=(1, 1, 1, 1), widths=(8, 16, 16, 32), num_classes=10):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make(block, widths[0], layers[0], 1)
        self.layer2 = self._make(block, widths[1], layers[1], 2)
        self.layer3 = self._make(block, widths[2], layers[2], 2)
        self.layer4 = self._make(block, widths[3], layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 0.5)
                nn.init.normal_(m.bias, 0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)

    def _make(self, block, planes, blocks, stride):
        down = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, down)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tiny_basic(seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    return TinyResNet(BasicBlock, (2, 1, 1, 1))


def tiny_bottleneck(seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    return TinyResNet(Bottleneck, (2, 1, 2, 1), widths=(8, 8, 16, 16))


@pytest.fixture(params=["basic", "bottleneck"])
def tiny_model(request):
    return tiny_basic() if request.param == "basic" else tiny_bottleneck()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test runs with one intra-op thread, restored afterwards: with several threads a reduction's partial sums
    depend on the core count, so a verdict (and the run time) would depend on the machine and on which earlier test
    last changed the setting. Subprocesses choose their own (torchrun sets OMP_NUM_THREADS=1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------- subprocess test helpers
REPO = Path(__file__).resolve().parents[1]


def subprocess_env(**extra) -> dict:
    """Environment for a test's child processes: one thread, this checkout importable, CI mode, plus ``extra``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CHEX_REPO=str(REPO), CI="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_process_group(cmd: list, *, cwd, env: dict, timeout: float, what: str = "") -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session, output merged; on timeout SIGKILL the whole group (launcher and workers) and
    fail the test with the tail of the output; afterwards kill any worker left behind."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{what or ' '.join(map(str, cmd[:4]))} did not finish within {timeout} s; last output:\n"
                    f"{out[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def zero_every_second_channel(model: nn.Module) -> None:
    """The masked dense layout of a released CHEX model: every second channel of each internal group zeroed (producer
    rows, norm γ and β, consumer input columns)."""
    from chex_core import resnet_groups

    mods = dict(model.named_modules())
    with torch.no_grad():
        for g in resnet_groups(model):
            drop = torch.arange(g.size) % 2 == 1
            mods[g.producer].weight[drop] = 0
            mods[g.norm].weight[drop] = 0
            mods[g.norm].bias[drop] = 0
            for c in g.consumers:
                mods[c].weight[:, drop] = 0
