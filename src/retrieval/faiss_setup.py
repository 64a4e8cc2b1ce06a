"""faiss, imported with its OpenMP threads waiting passively.

faiss bundles its own OpenMP runtime, which reads OMP_WAIT_POLICY once, when faiss is imported.
By default idle OpenMP threads spin; on a shared or busy machine that made faiss's k-means 10x
slower with 2 threads than with 1 (load 8 on 2 cores). Passive waiting costs nothing measurable
for the large batched calls made here. The variable is restored afterwards so that runtimes
loaded later (e.g. in extraction workers) keep their defaults; a value the user set is kept.
"""

from __future__ import annotations

import os

_user_policy = os.environ.get("OMP_WAIT_POLICY")
os.environ["OMP_WAIT_POLICY"] = _user_policy or "PASSIVE"
try:
    import faiss  # noqa: E402
finally:
    if _user_policy is None:
        del os.environ["OMP_WAIT_POLICY"]

__all__ = ["faiss"]
