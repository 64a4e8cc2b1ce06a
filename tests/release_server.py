"""scripts/download_pretrained.sh run against a local HTTP server holding a release tarball (the
script's DELF_RELEASE_BASE_URL), as the tests of the TF model imports use it."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import tarfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_download_script(tmp_path: Path, release_dir: Path, release: str, model: str
                        ) -> tuple[subprocess.CompletedProcess, ...]:
    """Serve `release_dir` as `<release>.tar.gz` (unpacking to `<release>/`) and run
    `download_pretrained.sh MODEL tmp_path/pretrained` three times: the first run, the rerun, and a
    run after the import's stamp was made by another converter version (which must import again)."""
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / f"{release}.tar.gz", "w:gz") as archive:
        archive.add(release_dir, arcname=release)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "DELF_RELEASE_BASE_URL": f"http://127.0.0.1:{server.server_port}"}
        command = ["bash", "scripts/download_pretrained.sh", model, str(tmp_path / "pretrained")]
        runs = []
        for run in range(3):
            if run == 2:
                (tmp_path / "pretrained" / f"{model}.import").write_text(f"{release} another converter\n")
            runs.append(subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600))
        return tuple(runs)
    finally:
        server.shutdown()
        thread.join()
