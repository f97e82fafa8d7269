"""The data-parallel example on 4 simulated CPU devices (a subprocess)."""

import json
import os
import subprocess
import sys

import pytest

from examples.data_parallel import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
SCRIPT = """
import json, jax, numpy as np
from examples.data_parallel import train
config = train.Config(steps=40, batch_size=64, sample_size=16)
losses4, acc4, state4 = train.train(config)
losses1, acc1, state1 = train.train(config, devices=jax.devices()[:1])
params4, params1 = state4[0], state1[0]
diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))
                 / np.max(np.abs(np.asarray(b))))
           for a, b in zip(jax.tree.leaves(params4), jax.tree.leaves(params1)))
shardings = {str(p.sharding.spec) for p in jax.tree.leaves(params4)}
print(json.dumps(dict(
  devices=len(jax.devices()), losses4=losses4, acc4=acc4, acc1=acc1,
  diff=diff, shardings=sorted(shardings))))
"""


@pytest.fixture(scope='module')
def result():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  out = subprocess.run(
    [sys.executable, '-c', SCRIPT],
    capture_output=True,
    text=True,
    check=True,
    cwd=ROOT,
    env=env,
    timeout=600,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_trains_on_four_devices_like_one(result):
  assert result['devices'] == 4
  losses = result['losses4']
  assert losses[-1] < 0.3 * losses[0]
  assert result['acc4'] > 0.85
  # float32: the CG amplifies reduction-order rounding (about 1e-3 after
  # 40 steps), so the runs agree closely but not bitwise.
  assert result['diff'] < 0.05
  assert abs(result['acc4'] - result['acc1']) < 0.03
  assert result['shardings'] == ['P()']  # replicated parameters


def test_divisibility_is_checked():
  with pytest.raises(ValueError, match='sample_size .10. must divide'):
    train.check_divisibility(train.Config(batch_size=64, sample_size=10), 1)
  with pytest.raises(ValueError, match='4 devices must divide sample_size'):
    train.check_divisibility(train.Config(batch_size=64, sample_size=2), 4)
