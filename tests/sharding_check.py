"""FROG with sharded parameters on 4 CPU devices; prints a JSON report.

Run by `test_sharding.py` in a fresh process (the device count is set before
jax starts). Float64 throughout. The update is compiled with FSDP-sharded
(kernels along their input axis), tensor-parallel (along their rows) and
2×2 FSDP+TP parameters, and compared with the single-device update; the
compiled programs' collectives are listed.
"""

import os

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'

import json  # noqa: E402
import sys  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
jax.config.update('jax_enable_x64', True)

import frog_optax as fo  # noqa: E402
from harness import sharding  # noqa: E402

SAMPLE = 8


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    f64 = dict(param_dtype=jnp.float64, dtype=jnp.float64)
    x = nn.relu(nn.Conv(8, (3, 3), **f64)(x))
    x = nn.relu(nn.Dense(32, **f64)(x.reshape(x.shape[0], -1)))
    return nn.Dense(16, **f64)(x)


def max_diff(a, b):
  return max(
    float(jnp.max(jnp.abs(u - v)))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def stats_on(stats, mesh, tp):
  """Sampled inputs replicated, output gradients split by rows on `tp`."""

  def place(st):
    if not isinstance(st, fo.LayerStats):
      return st
    rows = (None,) * (st.output_grads.ndim - 1) + (tp,)
    return fo.LayerStats(
      jax.device_put(st.inputs, NamedSharding(mesh, P())),
      jax.device_put(st.output_grads, NamedSharding(mesh, P(*rows))),
      st.geometry,
      st.layout,
    )

  return jax.tree.map(
    place, stats, is_leaf=lambda s: s is None or isinstance(s, fo.LayerStats)
  )


def main():
  model = Net()
  x = jax.random.normal(jax.random.key(0), (32, 6, 6, 4), jnp.float64)
  y = jnp.arange(32) % 16
  params = model.init(jax.random.key(1), x)['params']
  apply_fn = fo.linen.capture(model.apply)

  def loss_fn(p, x, y):
    logits = apply_fn({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grad_fn = fo.linen.value_and_grad(loss_fn, sample_size=SAMPLE)
  _, grads, stats = jax.jit(grad_fn)(params, x, y)
  tx = fo.frog(0.1, exclude=())
  update = jax.jit(lambda g, s, p, st: tx.update(g, s, p, frog_stats=st)[0])
  expected = update(grads, tx.init(params), params, stats)

  report = dict(devices=jax.device_count())
  kernels = [
    leaf.size
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    if path[-1].key == 'kernel'
  ]
  report['smallest_kernel'] = min(kernels)
  # What one layer's solve needs to exchange when its kernel is split
  # along the input axis: either the sampled outputs X(V) (partial sums) or
  # the kernel-shaped CG direction V, whichever is smaller.
  # Stats and parameters are both keyed by layer name: pair them by it.
  report['fsdp_bound'] = max(
    min(stats[name].output_grads.size, params[name]['kernel'].size)
    for name in params
  )
  meshes = {
    'tp': (Mesh(np.array(jax.devices()), ('model',)), None, 'model'),
    'fsdp': (Mesh(np.array(jax.devices()), ('data',)), 'data', None),
    'fsdp_tp': (
      Mesh(np.array(jax.devices()).reshape(2, 2), ('data', 'model')),
      'data',
      'model',
    ),
  }
  for name, (mesh, fsdp, tp) in meshes.items():
    shard = sharding.param_shardings(params, mesh, fsdp=fsdp, tp=tp)
    p = jax.device_put(params, shard)
    g = jax.device_put(grads, shard)
    state = tx.init(p)
    st = stats_on(stats, mesh, tp)
    got = update(g, state, p, st)
    hlo = update.lower(g, state, p, st).compile().as_text()
    report[name] = dict(
      update_vs_single=max_diff(got, expected),
      collectives=sharding.collectives(hlo),
      kernel_specs=[
        str(s.spec)
        for path, s in jax.tree_util.tree_flatten_with_path(shard)[0]
        if path[-1].key == 'kernel'
      ],
      momentum_sharded_like_params=all(
        m.sharding.spec == q.sharding.spec
        for m, q in zip(jax.tree.leaves(state), jax.tree.leaves(p))
        if m.shape == q.shape and m.ndim > 1
      ),
    )

  # A whole training step, batch split over 'data', parameters FSDP+TP.
  mesh, fsdp, tp = meshes['fsdp_tp']
  shard = sharding.param_shardings(params, mesh, fsdp=fsdp, tp=tp)

  def train_step(p, s, x, y):
    _, g, st = grad_fn(p, x, y)
    u, s = tx.update(g, s, p, frog_stats=st)
    return optax.apply_updates(p, u), s

  single = jax.jit(train_step)(params, tx.init(params), x, y)[0]
  by_batch = NamedSharding(mesh, P('data'))
  p = jax.device_put(params, shard)
  sharded_step = jax.jit(train_step, out_shardings=(shard, None))
  got = sharded_step(
    p, tx.init(p), jax.device_put(x, by_batch), jax.device_put(y, by_batch)
  )[0]
  report['train_step_fsdp_tp_vs_single'] = max_diff(got, single)
  print(json.dumps(report))


if __name__ == '__main__':
  main()
