"""FSDP + TP training on 4 simulated devices equals one-device training."""

import json
import os
import subprocess
import sys

import pytest

CHECK = """
import json
import jax
from examples.char_lm import corpus as corpus_lib
from examples.sharded_transformer import train
corpus = corpus_lib.load(100_000)
config = train.Config(steps=8)
sharded, (params, opt_state) = train.train(
    config, corpus, train.make_mesh(config.mesh_shape))
single, _ = train.train(config, corpus, None)
kernel = params['blocks']['mlp_in']['kernel']
momenta = [m for m in jax.tree.leaves(opt_state) if m.shape == kernel.shape]
print(json.dumps(dict(
    devices=jax.device_count(), sharded=sharded, single=single,
    kernel_spec=str(kernel.sharding.spec),
    momentum_specs=[str(m.sharding.spec) for m in momenta])))
"""


@pytest.fixture(scope='module')
def report():
  root = os.path.join(os.path.dirname(__file__), '..', '..')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  out = subprocess.run(
    [sys.executable, '-c', CHECK],
    cwd=root,
    env=env,
    capture_output=True,
    text=True,
    check=True,
    timeout=600,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_parameters_and_momentum_are_fsdp_and_tp_sharded(report):
  assert report['devices'] == 4
  # (layer, input, output): the scan's layer axis stays whole.
  assert report['kernel_spec'] == "P(None, 'data', 'model')"
  assert report['momentum_specs'] == [report['kernel_spec']]


def test_sharded_training_equals_single_device_training(report):
  sharded, single = report['sharded'], report['single']
  assert sharded == pytest.approx(single, rel=2e-4)
  assert sharded[-1] < sharded[0] - 0.5
