"""The suite's verdict does not depend on the machine: CPU tests never see a GPU (conftest.py), GPU tests are skipped
with a reason where there is none, and .ci/run re-runs the `numerics` tests as an AVX2 and as a baseline x86-64 CPU
with a probe that fails the pass if the CPU caps did not take effect."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import platform
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import conftest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_probe():
    spec = importlib.util.spec_from_file_location("cpu_probe", ROOT / ".ci" / "cpu_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_tests_see_no_gpu_in_process_or_in_children():
    assert not torch.cuda.is_available() and torch.cuda.device_count() == 0
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "current_accelerator"):
        assert accelerator.current_accelerator() is None
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""          # inherited by CLI, torchrun and mp.spawn children


def _item(gpu: bool):
    return SimpleNamespace(get_closest_marker=lambda name: object() if gpu and name == "gpu" else None)


@pytest.mark.parametrize("machine_has_gpu", [True, False])
def test_gpu_gate_hides_a_real_gpu_and_reveals_it_only_to_gpu_tests(monkeypatch, machine_has_gpu):
    """On a (simulated) GPU machine: hidden for CPU tests, visible to `gpu` tests; without one: `gpu` tests skip."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: machine_has_gpu)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(machine_has_gpu))
    hider = conftest._CudaHider()

    conftest._gate(_item(gpu=False), hider)                    # a CPU test
    assert not torch.cuda.is_available() and torch.cuda.device_count() == 0
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    if machine_has_gpu:
        try:
            conftest._gate(_item(gpu=True), hider)             # a gpu test gets the machine back
        except pytest.skip.Exception as e:                     # (a skip here would skip this test, not fail it)
            pytest.fail(f"a gpu test was skipped on a GPU machine: {e}")
        assert torch.cuda.is_available() and torch.cuda.device_count() == 1
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    else:
        with pytest.raises(pytest.skip.Exception, match="needs a CUDA GPU"):
            conftest._gate(_item(gpu=True), hider)
        assert not torch.cuda.is_available()                   # and the next CPU test is still hidden
    hider.reveal()


def test_ci_reruns_the_numerics_tests_as_other_cpus():
    run = (ROOT / ".ci" / "run").read_text()
    passes = {m.group(1): set(m.group(2).replace("\\\n", " ").split())
              for m in re.finditer(r'^emulate "[^"]+" (\w+) ((?:[^\n]*\\\n)*[^\n]*)$', run, re.M)}
    assert passes == {
        "avx2": {"ATEN_CPU_CAPABILITY=avx2", "ONEDNN_MAX_CPU_ISA=AVX2", "MKL_ENABLE_INSTRUCTIONS=AVX2",
                 "OPENBLAS_CORETYPE=Haswell"},
        "default": {"ATEN_CPU_CAPABILITY=default", "ONEDNN_MAX_CPU_ISA=SSE41", "MKL_CBWR=COMPATIBLE",
                    "OPENBLAS_CORETYPE=Nehalem"}}
    assert 'python .ci/cpu_probe.py --expect "$expect"' in run and "python -m pytest -q -m numerics" in run
    # the marked set is not empty, and covers the tests the emulated passes exist for
    marked = sum(len(re.findall(r"^@pytest\.mark\.numerics$", p.read_text(), re.M))
                 for p in (ROOT / "tests").glob("test_*.py"))
    assert marked >= 5


def test_cpu_probe_flags_caps_that_did_not_take_effect():
    probe = _load_probe()
    env = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE",
           "OPENBLAS_CORETYPE": "Nehalem"}
    good = {"aten": "DEFAULT", "onednn": "Intel SSE4.1", "mkl": "CNR:COMPATIBLE", "openblas": "Nehalem"}
    assert probe.check(good, "default", env) == []
    for key, value, words in [("aten", "AVX512", "ATen capability is AVX512"),
                              ("onednn", "Intel AVX-512 with Intel DL Boost", "oneDNN runs"),
                              ("mkl", "CNR:AUTO", "MKL reports CNR:AUTO"),
                              ("openblas", "SkylakeX", "OpenBLAS runs SkylakeX")]:
        errors = probe.check({**good, key: value}, "default", env)
        assert len(errors) == 1 and words in errors[0], errors


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 dispatch names")
def test_cpu_probe_sees_the_forced_dispatch():
    """ATEN_CPU_CAPABILITY=default exists on every x86-64 CPU: the probe must report it (as .ci/run relies on)."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41")
    out = subprocess.run([sys.executable, str(ROOT / ".ci" / "cpu_probe.py"), "--expect", "default"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"CPU dispatch: ATen DEFAULT \(native \w+\) \| oneDNN Intel SSE4\.1", out.stdout), out.stdout
