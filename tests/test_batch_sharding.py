"""FROG with the batch sharded over 4 CPU devices.

`batch_sharding_check.py` runs in a subprocess (the device count must be set
before jax starts) and reports the update difference and the compiled
program's collectives.
"""

import pytest

import subprocess_check

MOVES = ('all-gather', 'collective-permute', 'all-to-all')


@pytest.fixture(scope='module')
def report():
  return subprocess_check.json_report('batch_sharding_check.py')


def _float(dtype):
  return dtype.startswith(('f', 'bf'))


def test_sharded_update_equals_single_device(report):
  assert report['devices'] == 4
  assert report['max_relative_difference'] < 1e-8


def test_detector_sees_a_copy_of_activations(report):
  # The control slices the first s rows of a batch-sharded array.
  assert any(
    op in MOVES and _float(dtype)
    for op, dtype, _ in report['control_collectives']
  )


def test_no_activation_is_gathered_or_permuted(report):
  # Strided rows stay on their shard.
  moved = [c for c in report['collectives'] if c[0] in MOVES and _float(c[1])]
  assert not moved, moved


def test_no_activation_sized_collective(report):
  # Only reductions of parameter-sized arrays (gradients, Fisher traces,
  # CG inner products) cross devices; the sampled rows never do.
  largest = report['largest_parameter']
  big = [c for c in report['collectives'] if _float(c[1]) and c[2] > largest]
  assert not big, big
