"""Runs a check script in a fresh process and reads its JSON report.

Multi-device checks set `XLA_FLAGS` before jax starts, so they run apart
from the test process; each prints one JSON line last.
"""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(__file__)


def json_report(script: str, timeout: int = 600) -> dict:
  """The last stdout line of `python tests/<script>`, parsed as JSON."""
  out = subprocess.run(
    [sys.executable, os.path.join(HERE, script)],
    capture_output=True,
    text=True,
    check=True,
    timeout=timeout,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])
