"""`tca` sets OpenMP's short spin before torch or Numba loads (it is read once, at their start), and
leaves a value the user exported alone."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = "import os, sys, cli; print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules, 'numba' in sys.modules)"


def probe(**env) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env={**base, **env}, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_cli_sets_a_short_spin_before_torch_loads():
    from tca.openmp import SPINCOUNT

    assert probe() == f"{SPINCOUNT} False False"


def test_a_user_value_wins():
    assert probe(GOMP_SPINCOUNT="0").split()[0] == "0"
