"""The README/examples tutorial runs as written and its CHEX block stays under 20 lines."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tutorial_runs_and_is_short():
    src = (ROOT / "examples" / "tutorial.py").read_text().splitlines()
    start, end = [i for i, line in enumerate(src) if line.strip() == "# ---"]
    assert end - start - 1 < 20
    out = subprocess.run([sys.executable, "examples/tutorial.py"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert "density 0.50, events 4" in out.stdout
