"""``python -m benchmarks.gpu_check`` (or ``python benchmarks/gpu_check``) from the repository root."""
import sys
from pathlib import Path

if __package__ in (None, ""):            # run as a directory: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.gpu_check.cli import main
else:
    from .cli import main

sys.exit(main())
