"""FROG data-parallel across 2 processes (`jax.distributed`, gloo on CPU).

Two processes on 127.0.0.1, 2 CPU devices each, train 3 steps on their
halves of each global batch; a third process trains on the whole batches on
one device. Every process stops by itself within the timeout.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), 'multiprocess_check.py')
TIMEOUT = 120


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _finish(procs):
  try:
    for p in procs:
      _, err = p.communicate(timeout=TIMEOUT)
      assert p.returncode == 0, err[-3000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp('multiprocess')
  port = str(_free_port())
  launch = lambda *args: subprocess.Popen(
    [sys.executable, SCRIPT, *args],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  workers = [
    launch(str(i), '2', port, str(out / f'process{i}.npz')) for i in range(2)
  ]
  _finish(workers)
  _finish([launch('reference', str(out / 'reference.npz'))])
  load = lambda name: dict(np.load(out / f'{name}.npz'))
  return load('process0'), load('process1'), load('reference')


def test_processes_hold_identical_parameters(runs):
  first, second, _ = runs
  assert first.keys() == second.keys()
  for key in first:
    np.testing.assert_array_equal(first[key], second[key])


def test_two_processes_equal_one_process_on_the_global_batch(runs):
  first, _, reference = runs
  for key in first:
    assert np.abs(reference['initial' + key] - first[key]).max() > 1e-3
    np.testing.assert_allclose(first[key], reference[key], rtol=0, atol=1e-12)
