"""The loader tests with worker processes (tests/workers_cases.py), in a fresh interpreter.

They fork DataLoader workers, which crashed the suite's own long-lived process (see that file);
a fresh pytest process runs them as a pipeline run would, and this test fails when any fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_loader_worker_cases_pass_in_a_fresh_process():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/workers_cases.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "3 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
