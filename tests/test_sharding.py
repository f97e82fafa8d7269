"""FROG with FSDP- and tensor-parallel-sharded parameters (4 CPU devices).

`sharding_check.py` runs in a subprocess and reports, in float64, how far
the sharded updates are from the single-device one, and the collectives of
each compiled update.
"""

import pytest

import subprocess_check


@pytest.fixture(scope='module')
def report():
  return subprocess_check.json_report('sharding_check.py')


@pytest.mark.parametrize('layout', ['tp', 'fsdp', 'fsdp_tp'])
def test_sharded_update_equals_the_single_device_update(report, layout):
  assert report['devices'] == 4
  assert report[layout]['update_vs_single'] < 1e-12
  assert report[layout]['momentum_sharded_like_params']


def test_the_shardings_are_the_requested_ones(report):
  assert report['tp']['kernel_specs'][1] == "P(None, 'model')"
  assert report['fsdp']['kernel_specs'][1] == "P('data', None)"
  assert report['fsdp_tp']['kernel_specs'][0] == (
    "P(None, None, 'data', 'model')"
  )


def test_row_sharded_kernels_solve_without_any_communication(report):
  # Rows are independent systems: with the sampled inputs on every device
  # and each device holding its rows' output gradients, nothing moves.
  assert report['tp']['collectives'] == []


def test_input_sharded_kernels_exchange_only_per_layer_partials(report):
  # FSDP must exchange the partial products of the contracted axis: per
  # layer, the sampled outputs or the CG direction, never the samples or a
  # kernel larger than its outputs.
  for layout in ('fsdp', 'fsdp_tp'):
    moved = [elements for _, elements in report[layout]['collectives']]
    assert moved
    assert max(moved) <= report['fsdp_bound']


def test_a_whole_fsdp_tp_train_step_equals_the_single_device_step(report):
  assert report['train_step_fsdp_tp_vs_single'] < 1e-12
