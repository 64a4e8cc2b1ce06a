"""The layer contract in pyproject.toml covers every CLI module, and no library module imports a CLI."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _cli_modules() -> set[str]:
    return {f"src.{path.stem}" for path in (PROJECT_ROOT / "src").glob("*.py") if path.stem != "__init__"}


def test_every_cli_module_is_in_the_top_layer():
    settings = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in settings["contracts"] if c["type"] == "layers")["layers"]
    top_layer = {name.strip() for name in layers[0].split("|")}
    assert top_layer == _cli_modules()


def test_library_modules_import_no_cli_module():
    clis = _cli_modules()
    offenders = []
    for path in [*(PROJECT_ROOT / "src").glob("*/*.py"), *(PROJECT_ROOT / "model_utils").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in clis:
                offenders.append(f"{path.relative_to(PROJECT_ROOT)} imports {node.module}")
    assert offenders == []


def test_the_310_host_side_steps_start_without_mindspore():
    """The 310 preprocess needs no MindSpore: importing it used to load MindSpore through the
    extraction driver, 1.8 of its 2.1 s of start-up."""
    code = ("import sys, src.ascend310.preprocess, src.preprocess; "
            "print(sorted(m for m in sys.modules if m.startswith('mindspore')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
