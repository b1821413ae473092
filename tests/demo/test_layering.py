"""Arrows run one way: the demo imports the library, never the reverse; the BLAS pin that
the demo and the kernels share imports nothing of microattn."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
CORE = ["microattn", "microattn.autograd", "microattn.tensor", "microattn.ops", "microattn.functional",
        "microattn.nn", "microattn.optim", "microattn.gradcheck", "microattn.losses", "microattn.backends"]


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module a file imports, relative imports spelled as written (".demo", "..x")."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.update([base] + [f"{base.rstrip('.')}.{alias.name}" if node.module else base + alias.name
                                   for alias in node.names])
    return names


def test_importing_the_library_loads_no_demo_module():
    code = f"import sys; import {', '.join(CORE)}; print([m for m in sys.modules if m.startswith('microattn.demo')])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_no_core_file_names_the_demo():
    core_files = [path for path in (ROOT / "microattn").rglob("*.py")
                  if "demo" not in path.relative_to(ROOT / "microattn").parts and path.name != "__main__.py"]
    assert core_files
    for path in core_files:
        assert not any("demo" in name.split(".") for name in imported_modules(path)), path


def test_the_blas_pin_imports_nothing_of_microattn():
    names = imported_modules(ROOT / "kernels" / "blas.py")
    assert not any(name.startswith((".", "microattn")) for name in names), names
