"""The layer contract in pyproject.toml covers every CLI module, and no library module imports a CLI."""

import ast
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
