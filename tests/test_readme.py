"""The README's quick-start commands stay true: command 2 is what CI runs, command 1's CHEX job runs (shortened)."""
import pathlib
import re
import shlex
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def quickstart_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("pip install")]


def test_ci_runs_readme_test_command_verbatim():
    main_job, tests = quickstart_commands()
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()
    assert "pytest" in tests


def test_quickstart_main_job_runs(tmp_path):
    main_job, _ = quickstart_commands()
    job = main_job.split("&& ", 2)[2]                      # skip the two pip installs (done by CI already)
    argv = shlex.split(job)
    assert argv[:2] == ["python", "CLS/main.py"]
    # same flags, shortened (later flags win in argparse): one epoch, one event, 16 px digits (a quarter of the compute)
    argv += ["--epochs", "1", "--warmup", "0", "--T_max", "1", "--image-size", "16", "--workspace", str(tmp_path),
             "--no-progress"]
    out = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    log = out.stdout + out.stderr
    assert re.search(r"compact\s+\S+M\s+\S+M\s+\d+\.\d+", log), log[-2000:]
    assert (tmp_path / "compact.pth").is_file()


def test_every_test_the_readme_cites_exists():
    """The Reliability and faithfulness tables name the test behind each guarantee: each named test must exist
    (a renamed or deleted test would leave a guarantee citing nothing)."""
    text = (ROOT / "README.md").read_text()
    cited, missing, current = 0, [], None
    # `tests/test_x.py::test_y[...]`, `test_x.py`, and the short form `::test_y` that continues the last file named
    for m in re.finditer(r"`(?:tests/)?(test_\w+\.py)(?:::(\w+))?(?:\[[^\]]*\])?`|`::(\w+)(?:\[[^\]]*\])?`", text):
        path, name, continued = m.groups()
        current = path or current
        name = name or continued
        source = ROOT / "tests" / (current or "")
        if not source.is_file():
            missing.append(current)
            continue
        if name:
            cited += 1
            if not re.search(rf"^\s*(async )?def {name}\(", source.read_text(), re.M):
                missing.append(f"{current}::{name}")
    assert cited > 30, f"only {cited} tests cited: has the table moved?"
    assert not missing, f"README.md cites tests that do not exist: {missing}"
