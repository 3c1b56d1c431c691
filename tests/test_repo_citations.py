"""The repository stands alone: code, tests and docs cite files in the repository (docs/algorithm.md,
docs/upstream_conventions.md, docs/harness.md ...), never design notes that live outside it."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("CLS", "DET", "SEG", "chex_core", "chex_tasks", "benchmarks", "scripts", "docs", "docker", "examples", "tests",
           ".ci")
SUFFIXES = {".py", ".md", ".sh", ".txt", ".toml", ".yaml", ".yml", ".cfg", ""}
# assembled from pieces so that this file does not match itself
NOTES = "|".join(["ALGORITHM", "ARCHITECTURE", "ENVIRONMENT", "ECOSYSTEM", "RELIABILITY"])
OUTSIDE = re.compile(rf"\b(?:{NOTES})[_A-Z]*\.md\b|/work/" + "shared")


def _files():
    yield REPO / "README.md"
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts:
                yield path


def test_no_citation_of_notes_outside_the_repository():
    hits = []
    for path in _files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)
