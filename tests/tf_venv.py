"""Running a script in the test-only TensorFlow venv (scripts/setup_tf_env.sh): the project never
imports TensorFlow, tests that compare against it run it as a subprocess."""

import os
import subprocess
from pathlib import Path

import pytest

TF_VENV = Path(os.environ.get("DELF_TF_VENV", Path.home() / ".cache" / "delf" / "tf-venv"))


def run_tensorflow(script: Path, *arguments: str, timeout: int = 1800) -> None:
    """`script ARGUMENTS` in the TF venv; a missing venv or a failed run fails the test with its stderr."""
    python = TF_VENV / "bin" / "python"
    if not python.is_file():
        pytest.fail(f"the test-only TensorFlow environment is missing ({python}): run "
                    "`bash scripts/setup_tf_env.sh` (scripts/install.sh --test does)", pytrace=False)
    result = subprocess.run([str(python), str(script), *arguments], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""})
    if result.returncode:
        pytest.fail(f"{Path(script).name} {arguments[0] if arguments else ''} failed:\n{result.stderr[-4000:]}",
                    pytrace=False)
