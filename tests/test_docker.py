"""docker/Dockerfile, checked without Docker: same torch/torchvision pins as pyproject.toml, a pinned base image,
existing COPY sources, extras that exist, few layers, and a .dockerignore that keeps what the install needs."""
from __future__ import annotations

import fnmatch
import os
import re
import shlex

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = os.path.join(ROOT, "docker", "Dockerfile")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    out, buf = [], ""
    with open(DOCKERFILE) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not buf and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if buf and line.lstrip().startswith("#"):  # comment lines inside a continued instruction
                continue
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1] + " "
                continue
            full = (buf + line).strip()
            buf = ""
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def _args(instr) -> dict[str, str | None]:
    args = {}
    for word, rest in instr:
        if word == "ARG":
            name, eq, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"') if eq else None
    return args


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _pin(requirements: list[str], name: str) -> str:
    """The exact version pyproject allows at most for ``name`` (its ``<=`` or ``==`` bound)."""
    for req in requirements:
        m = re.match(rf"^\s*{re.escape(name)}\s*([<>=!~,.\d\s]*)", req)
        if m and re.match(rf"^\s*{re.escape(name)}\s*(?:[<>=!~]|$)", req):
            bound = re.search(r"(?:<=|==)\s*([\d.]+)", m.group(1))
            assert bound, f"pyproject's {name!r} requirement {req!r} has no upper pin (<= or ==)"
            return bound.group(1)
    raise AssertionError(f"pyproject.toml does not list {name}")


@pytest.fixture(scope="module")
def dockerfile():
    assert os.path.isfile(DOCKERFILE)
    return _instructions()


def test_torch_pins_match_pyproject(dockerfile):
    project = _pyproject()["project"]
    torch_pin = _pin(project["dependencies"], "torch")
    vision_pin = _pin(project["optional-dependencies"]["vision"], "torchvision")
    args = _args(dockerfile)
    assert args.get("TORCH_VERSION") == torch_pin
    assert args.get("TORCHVISION_VERSION") == vision_pin
    runs = " ".join(rest for word, rest in dockerfile if word == "RUN")
    # both pins in one pip command (the resolver then keeps the matched pair), together with the project itself
    one_cmd = re.search(r'pip install[^;&|]*torch==\$\{TORCH_VERSION\}[^;&|]*torchvision==\$\{TORCHVISION_VERSION\}'
                        r'[^;&|]*-e "?\.\[', runs)
    assert one_cmd, "torch and torchvision must be installed at the pins in the same pip command as the project"
    # with a torch-bearing base, pip is constrained to the base's versions so they are never replaced
    assert re.search(r"pip install -c \S+ -e", runs)


def test_base_image_is_pinned_and_matches_torch(dockerfile):
    args = _args(dockerfile)
    base = args.get("BASE_IMAGE")
    assert base, "ARG BASE_IMAGE needs a default"
    assert dockerfile[0] == ("ARG", f"BASE_IMAGE={base}"), "ARG BASE_IMAGE must precede FROM to be usable in it"
    assert ("FROM", "${BASE_IMAGE}") in dockerfile
    name, _, tag = base.rpartition(":")
    assert name and tag and "/" not in tag, f"base image {base!r} has no tag"
    assert tag != "latest" and "latest" not in tag and "nightly" not in tag
    if name.endswith("pytorch/pytorch"):  # official tags start with the torch version they carry
        assert tag.startswith(_pin(_pyproject()["project"]["dependencies"], "torch") + "-"), tag
        assert "cuda" in tag


def test_copy_sources_exist_and_layers_are_few(dockerfile):
    copies = [rest for word, rest in dockerfile if word in ("COPY", "ADD")]
    assert copies
    for rest in copies:
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        for src in parts[:-1]:
            assert os.path.exists(os.path.join(ROOT, src)), f"COPY source {src!r} does not exist in the repo"
    # each filesystem layer of a multi-GB torch image is copied again by some storage drivers
    assert sum(word in ("RUN", "COPY", "ADD") for word, _ in dockerfile) <= 3
    assert ("WORKDIR", "/workspace/chex") in dockerfile


def test_extras_exist_and_python_bootstrap(dockerfile):
    extras = _args(dockerfile).get("EXTRAS") or ""
    known = set(_pyproject()["project"]["optional-dependencies"])
    assert "vision" in extras.split(",")
    assert set(extras.split(",")) <= known
    runs = " ".join(rest for word, rest in dockerfile if word == "RUN")
    # a base without Python gets it from apt, in a venv that PATH points to
    assert "apt-get install" in runs and "python3-venv" in runs and "-m venv /opt/venv" in runs
    env = " ".join(rest for word, rest in dockerfile if word == "ENV")
    assert "PATH=/opt/venv/bin:" in env


def test_dockerignore_keeps_the_install_inputs():
    path = os.path.join(ROOT, ".dockerignore")
    assert os.path.isfile(path), "a top-level .dockerignore keeps .git, venvs and run outputs out of the context"
    patterns = [p.strip() for p in open(path) if p.strip() and not p.lstrip().startswith("#")]
    assert ".git" in patterns
    project = _pyproject()
    needed = ["pyproject.toml", "setup.py", project["project"].get("readme", "README.md"),
              *[inc.rstrip("*") for inc in project["tool"]["setuptools"]["packages"]["find"]["include"]]]
    needed += ["chex_core/__init__.py", "scripts/export_compact.py"]
    for item in needed:
        for pat in patterns:
            if pat.startswith("!"):
                continue
            p = pat.removeprefix("**/")
            assert not (fnmatch.fnmatch(item, pat) or fnmatch.fnmatch(item, p)
                        or fnmatch.fnmatch(item.split("/")[0], pat)), f".dockerignore pattern {pat!r} drops {item}"
