"""Run in a fresh process: FROG under a 4-device batch-sharded jit (CPU).

`XLA_FLAGS` must give the host 4 devices before jax starts, so
`test_sharding.py` runs this file in a subprocess. It prints one JSON line:
the largest relative difference between the sharded and the single-device
update (float64), and the collectives of both compiled programs.
"""

import json
import os
import re
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'

import jax  # noqa: E402

jax.config.update('jax_enable_x64', True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

import frog_optax as fo  # noqa: E402

import models  # noqa: E402

BATCH, SAMPLE = 16, 8
_COLLECTIVE = re.compile(
  r'= (.*?) (all-gather|collective-permute|all-to-all|reduce-scatter|'
  r'all-reduce)(?:-start)?\('
)


def collectives(compiled_text):
  """(op, element type, elements) of every cross-device result, per array."""
  found = set()
  for line in compiled_text.splitlines():
    match = _COLLECTIVE.search(line)
    if match:
      for dtype, dims in re.findall(r'(\w+)\[([\d,]*)\]', match.group(1)):
        size = int(np.prod([int(d) for d in dims.split(',') if d]))
        found.add((match.group(2), dtype, size))
  return sorted(found)


def main():
  model, variables, _, _ = models.setup(jnp.float64)
  x = jax.random.normal(jax.random.key(1), (BATCH, 6, 6, 2), jnp.float64)
  y = jnp.arange(BATCH) % 3
  loss_fn = models.make_loss(model)
  tx = fo.frog(0.1, exclude='head')
  params, batch_stats = variables['params'], variables['batch_stats']
  opt_state = tx.init(params)

  def step(params, batch_stats, opt_state, x, y):
    (loss, _), grads, stats = fo.linen.value_and_grad(
      loss_fn, sample_size=SAMPLE, has_aux=True
    )(params, batch_stats, x, y)
    updates, _ = tx.update(grads, opt_state, params, frog_stats=stats)
    return updates, loss

  single, _ = jax.jit(step)(params, batch_stats, opt_state, x, y)

  mesh = Mesh(np.array(jax.devices()), ('batch',))
  replicated = NamedSharding(mesh, PartitionSpec())
  by_batch = NamedSharding(mesh, PartitionSpec('batch'))
  sharded_step = jax.jit(
    step,
    in_shardings=(replicated, replicated, replicated, by_batch, by_batch),
    out_shardings=(replicated, replicated),
  )
  xs, ys = jax.device_put(x, by_batch), jax.device_put(y, by_batch)
  sharded, _ = sharded_step(params, batch_stats, opt_state, xs, ys)
  rel = jax.tree.map(
    lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b))),
    sharded,
    single,
  )
  compiled = sharded_step.lower(
    params, batch_stats, opt_state, xs, ys
  ).compile()

  # Control: the first s rows of a batch-sharded array live on one device,
  # so taking them must move activations; the detector has to see it.
  def first_rows(x):
    return jnp.sum(x[:SAMPLE] ** 2, axis=0)

  control = (
    jax.jit(first_rows, in_shardings=by_batch, out_shardings=replicated)
    .lower(xs)
    .compile()
  )
  print(
    json.dumps(
      dict(
        devices=len(jax.devices()),
        max_relative_difference=max(jax.tree.leaves(rel)),
        collectives=collectives(compiled.as_text()),
        largest_parameter=max(p.size for p in jax.tree.leaves(params)),
        sampled_activation=SAMPLE * 6 * 6 * 2,
        control_collectives=collectives(control.as_text()),
      )
    )
  )


if __name__ == '__main__':
  main()
