"""How OpenMP threads wait between parallel regions, for torch's bundled runtime and the one Numba
loads. Read once, when a runtime starts: `configure_openmp` must run before torch or Numba is imported.

Measured on 2 cores (session 8): fully passive threads (OMP_WAIT_POLICY=PASSIVE, the former setting)
make every small kernel pay a futex wake-up, so an epoch of SASRec took 9.6 s against 5.2 s with
spinning threads and beam search ran at 3.4 samples/s against 4.8-5.1; unbounded spinning (the
runtime's default) makes cf_dist, where torch's and Numba's runtimes alternate, 4-6x slower while
another process loads the cores (25-38 s against 6.6 s). A short spin (GOMP_SPINCOUNT 10,000, tens of
microseconds) keeps both: 5.7 s an epoch, 5.1 samples/s, cf_dist 9.4-10.2 s under the same load as
passive's 9.9 s. A value the user exported wins.
"""
from __future__ import annotations

import os

SPINCOUNT = "10000"


def configure_openmp() -> None:
    os.environ.setdefault("GOMP_SPINCOUNT", SPINCOUNT)
