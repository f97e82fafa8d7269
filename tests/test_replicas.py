"""FROG under pmap and shard_map on 2 CPU devices, with `axis_name`.

`replicas_check.py` runs in a subprocess (the device count must be set
before jax starts) and reports how far replicas and the single-device run
are apart.
"""

import pytest

import subprocess_check


@pytest.fixture(scope='module')
def report():
  return subprocess_check.json_report('replicas_check.py')


def test_pmap_replicas_stay_identical_with_axis_name(report):
  assert report['devices'] == 2
  assert report['pmap_replica_spread'] == 0.0
  assert not report['pmap_warned']


def test_pmap_equals_jit_on_the_global_batch(report):
  assert report['pmap_vs_jit'] < 1e-10


def test_without_axis_name_replicas_drift_and_a_warning_says_so(report):
  # What axis_name fixes: each replica preconditions with its own sample.
  assert report['unsynced_replica_spread'] > 1e-3
  assert report['unsynced_warned']


def test_shard_map_equals_jit(report):
  assert report['shard_map_vs_jit'] < 1e-10


def test_nnx_gathers_the_same_stats_on_every_replica(report):
  assert report['nnx_replica_spread'] == 0.0
  assert report['nnx_vs_single'] < 1e-12
