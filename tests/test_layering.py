"""chex_core depends on torch, numpy and scipy only, and never on a task folder."""
import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
ALLOWED = {"torch", "numpy", "scipy"}


def test_chex_core_imports_only_torch_numpy_scipy():
    stdlib = set(sys.stdlib_module_names)
    for path in (ROOT / "chex_core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                assert top in ALLOWED or top in stdlib or top == "__future__", f"{path.name} imports {n}"


def test_chex_core_imports_with_task_dependencies_blocked():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in {'torchvision','pycocotools','tqdm','tensorboard','CLS','DET','SEG',"
            "'chex_tasks'}:\n"
            "            raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import chex_core, chex_core.cli, chex_core.engine, chex_core.checkpoint, chex_core.distributed\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
