"""`python -m vl.eval ...`: the evaluation command (see vl.metrics.cli).

The metrics never call BLAS, so the command asks OpenBLAS for one thread before NumPy loads:
spawning its thread pool is a measurable share of the command's start-up (more on big hosts).
An explicit setting in the environment wins.
"""

import os

if __name__ == "__main__":
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

from vl.metrics.cli import main  # noqa: E402  (after the thread settings, on purpose)

if __name__ == "__main__":
    raise SystemExit(main())
