"""Run in a fresh process: FROG under pmap and shard_map on 2 CPU devices.

`XLA_FLAGS` must give the host 2 devices before jax starts, so
`test_replicas.py` runs this file in a subprocess. It trains a small conv
net for a few steps on per-replica batches, gradients averaged with
`lax.pmean` (as Flax's ImageNet example does), and prints one JSON line:
how far the replicas are apart, with and without `axis_name`, and how far
from a single-device `jit` run on the global batch (float64).
"""

import json
import os
import sys
import warnings

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'

import jax  # noqa: E402

jax.config.update('jax_enable_x64', True)

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

import frog_optax as fo  # noqa: E402

DEVICES, LOCAL_BATCH, LOCAL_SAMPLE, STEPS = 2, 8, 4, 5
AXIS = 'batch'


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), param_dtype=jnp.float64)(x))
    x = nn.relu(nn.Dense(6, param_dtype=jnp.float64)(x.mean(axis=(1, 2))))
    return nn.Dense(3, name='head', param_dtype=jnp.float64)(x)


MODEL = Net()
APPLY = fo.linen.capture(MODEL.apply)
TX = fo.frog(0.1)


def loss_fn(params, x, y):
  logits = APPLY({'params': params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def step(params, opt_state, x, y, sample_size, axis_name=None, pmean=False):
  _, grads, stats = fo.linen.value_and_grad(
    loss_fn, sample_size=sample_size, axis_name=axis_name
  )(params, x, y)
  if pmean:
    grads = lax.pmean(grads, AXIS)
  updates, opt_state = TX.update(grads, opt_state, params, frog_stats=stats)
  return optax.apply_updates(params, updates), opt_state


def batches():
  rng = np.random.default_rng(0)
  for _ in range(STEPS):
    x = rng.normal(size=(DEVICES * LOCAL_BATCH, 6, 6, 2))
    yield jnp.asarray(x), jnp.asarray(rng.integers(0, 3, DEVICES * LOCAL_BATCH))


def per_device(a):
  return a.reshape((DEVICES, -1) + a.shape[1:])


def relative(a, b):
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  return max(
    float(jnp.abs(x - y).max() / jnp.abs(y).max()) for x, y in zip(a, b)
  )


def replica_spread(tree):
  return max(float(jnp.abs(a - a[0]).max()) for a in jax.tree.leaves(tree))


def run_jit(params):
  # Strided rows of the global batch are the replicas' strided rows.
  f = jax.jit(lambda p, s, x, y: step(p, s, x, y, DEVICES * LOCAL_SAMPLE))
  state = TX.init(params)
  for x, y in batches():
    params, state = f(params, state, x, y)
  return params


def run_pmap(params, axis_name):
  f = jax.pmap(
    lambda p, s, x, y: step(p, s, x, y, LOCAL_SAMPLE, axis_name, pmean=True),
    axis_name=AXIS,
  )
  replicate = lambda t: jax.tree.map(lambda a: jnp.stack([a] * DEVICES), t)
  params, state = replicate(params), replicate(TX.init(params))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    for x, y in batches():
      params, state = f(params, state, per_device(x), per_device(y))
  warned = any(issubclass(w.category, fo.UnsyncedStatsWarning) for w in caught)
  return params, warned


def run_shard_map(params):
  mesh = jax.make_mesh((DEVICES,), (AXIS,))
  f = jax.jit(
    jax.shard_map(
      lambda p, s, x, y: step(p, s, x, y, LOCAL_SAMPLE, AXIS, pmean=True),
      mesh=mesh,
      in_specs=(P(), P(), P(AXIS), P(AXIS)),
      out_specs=(P(), P()),
      check_vma=False,
    )
  )
  state = TX.init(params)
  batch = jax.NamedSharding(mesh, P(AXIS))
  for x, y in batches():
    x, y = jax.device_put(x, batch), jax.device_put(y, batch)
    params, state = f(params, state, x, y)
  return params


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(5, 6, param_dtype=jnp.float64, rngs=rngs)
    self.head = nnx.Linear(6, 3, param_dtype=jnp.float64, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.hidden(x)))


def nnx_stats_spread():
  """NNX: gathered stats equal on every replica and to the global ones."""
  model = NnxNet(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 5)))
  loss = lambda m, x: jnp.mean(m(x) ** 2)

  def stats_of(state, x, sample_size, axis_name=None):
    _, _, stats = fo.nnx.value_and_grad(
      loss, sample_size=sample_size, axis_name=axis_name
    )(nnx.merge(graphdef, state), x)
    return stats

  replicated = jax.pmap(
    lambda s, x: stats_of(s, x, LOCAL_SAMPLE, AXIS),
    axis_name=AXIS,
    in_axes=(None, 0),
  )(state, per_device(x))
  single = stats_of(state, x, DEVICES * LOCAL_SAMPLE)
  first = jax.tree.map(lambda a: a[0], replicated)
  return replica_spread(replicated), relative(first, single)


def main():
  x0 = jnp.zeros((1, 6, 6, 2))
  params = MODEL.init(jax.random.key(0), x0)['params']
  want = run_jit(params)
  synced, warned_synced = run_pmap(params, AXIS)
  unsynced, warned_unsynced = run_pmap(params, None)
  sharded = run_shard_map(params)
  nnx_spread, nnx_vs_single = nnx_stats_spread()
  print(
    json.dumps(
      dict(
        devices=jax.device_count(),
        pmap_replica_spread=replica_spread(synced),
        pmap_vs_jit=relative(jax.tree.map(lambda a: a[0], synced), want),
        pmap_warned=warned_synced,
        unsynced_replica_spread=replica_spread(unsynced),
        unsynced_warned=warned_unsynced,
        shard_map_vs_jit=relative(sharded, want),
        nnx_replica_spread=nnx_spread,
        nnx_vs_single=nnx_vs_single,
      )
    )
  )


if __name__ == '__main__':
  main()
