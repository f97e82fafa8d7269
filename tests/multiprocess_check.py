"""One process of a 2-process FROG data-parallel run on localhost.

  python tests/multiprocess_check.py PROCESS_ID NUM_PROCESSES PORT OUT.npz
  python tests/multiprocess_check.py reference OUT.npz

Each process owns 2 CPU devices and its half of every global batch, which it
hands to `jax.make_array_from_process_local_data`; the step is jitted over
the 4-device mesh with the parameters replicated. `reference` trains the
same model on the same global batches in one process on one device (and
also writes the initial parameters, keys prefixed `initial`). Float64;
every process writes its final parameters to OUT.npz.
"""

import os

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'

import sys  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

jax.config.update('jax_enable_x64', True)

import frog_optax as fo  # noqa: E402

STEPS = 3
GLOBAL_BATCH = 16
SAMPLE = 8


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    f64 = dict(param_dtype=jnp.float64, dtype=jnp.float64)
    x = nn.relu(nn.Conv(6, (3, 3), **f64)(x))
    x = nn.relu(nn.Dense(16, **f64)(x.reshape(x.shape[0], -1)))
    return nn.Dense(4, **f64)(x)


def global_batch(step):
  rng = np.random.default_rng(step)
  x = rng.normal(size=(GLOBAL_BATCH, 5, 5, 3))
  y = rng.integers(0, 4, GLOBAL_BATCH)
  return x, y


def make_step():
  model = Net()
  apply_fn = fo.linen.capture(model.apply)
  tx = fo.frog(0.1, exclude=())

  def loss_fn(p, x, y):
    logits = apply_fn({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grad_fn = fo.linen.value_and_grad(loss_fn, sample_size=SAMPLE)

  def step(p, s, x, y):
    _, g, stats = grad_fn(p, x, y)
    u, s = tx.update(g, s, p, frog_stats=stats)
    return optax.apply_updates(p, u), s

  x0, _ = global_batch(0)
  params = model.init(jax.random.key(0), jnp.asarray(x0[:2]))['params']
  return step, params, tx


def arrays(params, prefix=''):
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {
    prefix + jax.tree_util.keystr(k): np.asarray(jax.device_get(v))
    for k, v in flat
  }


def reference(out):
  step, params, tx = make_step()
  initial = arrays(params, prefix='initial')
  step = jax.jit(step)
  state = tx.init(params)
  for i in range(STEPS):
    x, y = global_batch(i)
    params, state = step(params, state, jnp.asarray(x), jnp.asarray(y))
  np.savez(out, **arrays(params), **initial)


def worker(process_id, num_processes, port, out):
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address=f'127.0.0.1:{port}',
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=60,
  )
  assert jax.process_count() == num_processes
  step, params, tx = make_step()
  mesh = Mesh(np.array(jax.devices()), ('batch',))
  replicated = NamedSharding(mesh, P())
  by_batch = NamedSharding(mesh, P('batch'))
  # Every process initialised the same parameters (same key): replicate.
  params = jax.tree.map(
    lambda v: jax.make_array_from_process_local_data(replicated, np.asarray(v)),
    params,
  )
  step = jax.jit(step, out_shardings=(replicated, replicated))
  state = jax.jit(tx.init, out_shardings=replicated)(params)
  local = GLOBAL_BATCH // num_processes
  rows = slice(process_id * local, (process_id + 1) * local)
  for i in range(STEPS):
    x, y = global_batch(i)
    x = jax.make_array_from_process_local_data(by_batch, x[rows])
    y = jax.make_array_from_process_local_data(by_batch, y[rows])
    params, state = step(params, state, x, y)
  np.savez(out, **arrays(params))
  jax.distributed.shutdown()


if __name__ == '__main__':
  if sys.argv[1] == 'reference':
    reference(sys.argv[2])
  else:
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
