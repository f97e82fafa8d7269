"""The any-JAX capture: Equinox, plain dicts and raw Flax kernels.

Every client is checked in float64 against the linen capture on the same
network written with Flax modules (the same weights, moved to Flax's
layout): the same stats and the same FROG update. Value and gradients are
those of `jax.value_and_grad`, bit for bit.
"""

import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import frog_optax as fo

B, S = 8, 4  # batch, Fisher sample


def _xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _labels(key, n=B, classes=3):
  return jax.random.randint(key, (n,), 0, classes)


def _frog_update(params, grads, stats, layouts):
  tx = fo.frog(0.1, layouts=layouts)
  updates, _ = tx.update(grads, tx.init(params), params, frog_stats=stats)
  return updates


def _linen_reference(module, flax_params, x, y):
  """Grads, stats and FROG update of the linen capture."""
  apply_fn = fo.linen.capture(module.apply)
  loss_fn = lambda p, x, y: _xent(apply_fn({'params': p}, x), y)
  _, grads, stats = fo.linen.value_and_grad(loss_fn, sample_size=S)(
    flax_params, x, y
  )
  return grads, stats, _frog_update(flax_params, grads, stats, None)


def _ours(loss_fn, params, *args):
  value, grads, stats = jax.jit(fo.jax.value_and_grad(loss_fn, sample_size=S))(
    params, *args
  )
  want_value, want_grads = jax.jit(jax.value_and_grad(loss_fn))(params, *args)
  chex.assert_trees_all_equal((value, grads), (want_value, want_grads))
  layouts = fo.jax.layouts(loss_fn, params, *args)
  return grads, stats, _frog_update(params, grads, stats, layouts), layouts


def _assert_trains(loss_fn, params, x, y, learning_rate=0.3, steps=8):
  """A few jitted FROG steps with the any-JAX capture lower the loss."""
  tx = fo.frog(learning_rate, layouts=fo.jax.layouts(loss_fn, params, x, y))
  capture = fo.jax.value_and_grad(loss_fn, sample_size=S)

  @jax.jit
  def step(params, state):
    loss, grads, stats = capture(params, x, y)
    updates, state = tx.update(grads, state, params, frog_stats=stats)
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0]


def _assert_same_stats(got, want):
  chex.assert_trees_all_close(got.inputs, want.inputs, rtol=1e-12)
  chex.assert_trees_all_close(got.output_grads, want.output_grads, rtol=1e-12)
  assert got.geometry == want.geometry


class FlaxMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(5)(x))
    return nn.Dense(3)(h)


def test_plain_dict_mlp_matches_flax_dense():
  key = jax.random.key(0)
  x = jax.random.normal(key, (B, 4))
  y = _labels(jax.random.key(1))
  flax_params = FlaxMLP().init(key, x)['params']
  params = {
    'w1': flax_params['Dense_0']['kernel'],
    'b1': flax_params['Dense_0']['bias'],
    'w2': flax_params['Dense_1']['kernel'],
    'b2': flax_params['Dense_1']['bias'] + 0.1,
  }
  flax_params['Dense_1']['bias'] = params['b2']

  def loss_fn(p, x, y):
    h = jnp.tanh(x @ p['w1'] + p['b1'])
    return _xent(h @ p['w2'] + p['b2'], y)

  _, stats, update, layouts = _ours(loss_fn, params, x, y)
  _, want_stats, want_update = _linen_reference(FlaxMLP(), flax_params, x, y)
  assert stats['w1'].layout.bias_path == 'b1'
  assert stats['b1'] is None
  assert layouts['w2'] == fo.ParamLayout(bias_path='b2')
  _assert_same_stats(stats['w1'], want_stats['Dense_0'])
  _assert_same_stats(stats['w2'], want_stats['Dense_1'])
  for ours, theirs in (('w1', 'kernel'), ('b1', 'bias'), ('w2', 'kernel')):
    layer = 'Dense_0' if ours.endswith('1') else 'Dense_1'
    chex.assert_trees_all_close(
      update[ours], want_update[layer][theirs], rtol=1e-10
    )
  _assert_trains(loss_fn, params, x, y)


def _eqx_params(model):
  params, static = eqx.partition(model, eqx.is_inexact_array)
  return params, static


def test_equinox_mlp_matches_flax_dense():
  key = jax.random.key(2)
  x = jax.random.normal(key, (B, 4))
  y = _labels(jax.random.key(3))
  model = eqx.nn.MLP(4, 3, 5, depth=1, activation=jnp.tanh, key=key)
  model = jax.tree.map(
    lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, model
  )
  params, static = _eqx_params(model)

  def loss_fn(p, x, y):
    return _xent(jax.vmap(eqx.combine(p, static))(x), y)

  _, stats, update, _ = _ours(loss_fn, params, x, y)
  first, last = model.layers
  flax_params = {
    'Dense_0': {'kernel': first.weight.T, 'bias': first.bias},
    'Dense_1': {'kernel': last.weight.T, 'bias': last.bias},
  }
  _, want_stats, want_update = _linen_reference(FlaxMLP(), flax_params, x, y)
  for i, layer in enumerate(('Dense_0', 'Dense_1')):
    got = stats.layers[i].weight
    assert got.layout.bias_path == f'layers/{i}/bias'
    _assert_same_stats(got, want_stats[layer])
    chex.assert_trees_all_close(
      update.layers[i].weight, want_update[layer]['kernel'].T, rtol=1e-10
    )
    chex.assert_trees_all_close(
      update.layers[i].bias, want_update[layer]['bias'], rtol=1e-10
    )
  _assert_trains(loss_fn, params, x, y)


class FlaxCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), padding=1)(x))
    x = nn.Conv(3, (3, 3), strides=2, padding='VALID')(x)
    return x.mean(axis=(1, 2))


class EqxCNN(eqx.Module):
  conv1: eqx.nn.Conv2d
  conv2: eqx.nn.Conv2d

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.conv1 = eqx.nn.Conv2d(2, 4, 3, padding=1, key=k1)
    self.conv2 = eqx.nn.Conv2d(4, 3, 3, stride=2, key=k2)

  def __call__(self, x):  # one example, (C, H, W)
    return self.conv2(jax.nn.relu(self.conv1(x))).mean(axis=(1, 2))


def _eqx_cnn(key):
  model = EqxCNN(key)
  return jax.tree.map(
    lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, model
  )


def test_equinox_cnn_matches_flax_conv():
  key = jax.random.key(4)
  x_nchw = jax.random.normal(key, (B, 2, 7, 7))
  y = _labels(jax.random.key(5))
  model = _eqx_cnn(key)
  params, static = _eqx_params(model)

  def loss_fn(p, x, y):
    return _xent(jax.vmap(eqx.combine(p, static))(x), y)

  _, stats, update, _ = _ours(loss_fn, params, x_nchw, y)
  to_hwio = lambda w: jnp.transpose(w, (2, 3, 1, 0))
  flax_params = {
    f'Conv_{i}': {'kernel': to_hwio(c.weight), 'bias': c.bias.reshape(-1)}
    for i, c in enumerate((model.conv1, model.conv2))
  }
  x_nhwc = jnp.transpose(x_nchw, (0, 2, 3, 1))
  _, want_stats, want_update = _linen_reference(
    FlaxCNN(), flax_params, x_nhwc, y
  )
  for i, name in enumerate(('conv1', 'conv2')):
    got = getattr(stats, name).weight
    assert got.layout.kernel_perm == (2, 3, 1, 0)
    _assert_same_stats(got, want_stats[f'Conv_{i}'])
    layer = getattr(update, name)
    chex.assert_trees_all_close(
      to_hwio(layer.weight), want_update[f'Conv_{i}']['kernel'], rtol=1e-10
    )
    chex.assert_trees_all_close(
      layer.bias.reshape(-1), want_update[f'Conv_{i}']['bias'], rtol=1e-10
    )


class RawConv1D(nn.Module):
  """Hugging Face's FlaxConv1D pattern: a (features, in) kernel, jnp.dot."""

  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
      'kernel', nn.initializers.normal(0.5), (self.features, x.shape[-1])
    )
    bias = self.param('bias', nn.initializers.normal(0.1), (self.features,))
    return jnp.dot(x, kernel.T) + bias


class RawMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(RawConv1D(5)(x))
    return RawConv1D(3)(h)


def test_raw_flax_kernel_with_jnp_dot_matches_flax_dense():
  key = jax.random.key(6)
  x = jax.random.normal(key, (B, 4))
  y = _labels(jax.random.key(7))
  model = RawMLP()
  params = model.init(key, x)['params']

  def loss_fn(p, x, y):
    return _xent(model.apply({'params': p}, x), y)

  _, stats, update, layouts = _ours(loss_fn, params, x, y)
  # A {kernel, bias} module dict: its stats are module-level.
  assert isinstance(stats['RawConv1D_0'], fo.LayerStats)
  assert layouts['RawConv1D_0'].kernel_perm == (1, 0)
  flax_params = {
    f'Dense_{i}': {
      'kernel': params[f'RawConv1D_{i}']['kernel'].T,
      'bias': params[f'RawConv1D_{i}']['bias'],
    }
    for i in range(2)
  }
  _, want_stats, want_update = _linen_reference(FlaxMLP(), flax_params, x, y)
  for i in range(2):
    _assert_same_stats(stats[f'RawConv1D_{i}'], want_stats[f'Dense_{i}'])
    chex.assert_trees_all_close(
      update[f'RawConv1D_{i}']['kernel'].T,
      want_update[f'Dense_{i}']['kernel'],
      rtol=1e-10,
    )
  _assert_trains(loss_fn, params, x, y)


def test_equinox_cnn_trains_under_jit():
  key = jax.random.key(8)
  x = jax.random.normal(key, (16, 2, 7, 7))
  y = (x[:, 0].mean(axis=(1, 2)) > 0).astype(jnp.int32)
  params, static = _eqx_params(_eqx_cnn(key))

  def loss_fn(p, x, y):
    return _xent(jax.vmap(eqx.combine(p, static))(x), y)

  _assert_trains(loss_fn, params, x, y)


def test_checkpoint_and_jit_calls_are_entered():
  key = jax.random.key(9)
  params = {
    'w': jax.random.normal(key, (4, 3)),
    'b': jnp.zeros(3) + 0.1,
  }
  x = jax.random.normal(jax.random.key(10), (B, 4))
  y = _labels(jax.random.key(11))
  layer = lambda p, x: jnp.tanh(x @ p['w'] + p['b'])
  plain = lambda p, x, y: _xent(layer(p, x), y)
  wrapped = lambda p, x, y: _xent(jax.checkpoint(jax.jit(layer))(p, x), y)
  _, want, _, _ = _ours(plain, params, x, y)
  _, got, _, _ = _ours(wrapped, params, x, y)
  _assert_same_stats(got['w'], want['w'])
  assert got['w'].layout.bias_path == 'b'
  # The checkpoint stays one in the traced step.
  jaxpr = jax.make_jaxpr(fo.jax.value_and_grad(wrapped, sample_size=S))(
    params, x, y
  )
  assert 'remat' in str(jaxpr) or 'checkpoint' in str(jaxpr)


def test_what_is_not_matched_goes_to_the_fallback_with_a_reason():
  key = jax.random.key(12)
  k = jax.random.split(key, 4)
  params = {
    'tied': jax.random.normal(k[0], (4, 4)),
    'scale': jnp.ones(4),
    'looped': jax.random.normal(k[1], (4, 4)),
    'head': jax.random.normal(k[2], (4, 3)),
  }
  x = jax.random.normal(k[3], (B, 4))
  y = _labels(jax.random.key(13))

  def loss_fn(p, x, y):
    h = jnp.tanh(jnp.tanh(x @ p['tied']) @ p['tied']) * p['scale']
    h, _ = jax.lax.scan(
      lambda c, _: (jnp.tanh(c @ p['looped']), None), h, None, 2
    )
    return _xent(h @ p['head'], y)

  _, grads, stats = fo.jax.value_and_grad(loss_fn, sample_size=S)(params, x, y)
  assert 'matmuls' in stats['tied'].reason
  assert 'mul' in stats['scale'].reason
  assert 'scan' in stats['looped'].reason
  layouts = fo.jax.layouts(loss_fn, params, x, y)
  assert fo.frog_param_labels(params, layouts=layouts) == {
    'tied': 'fallback',
    'scale': 'fallback',
    'looped': 'fallback',
    'head': 'frog',
  }
  tx = fo.frog(0.1, layouts=layouts)
  text = fo.describe(params, stats, tx)
  for name in ('tied', 'scale', 'looped'):
    line = next(
      row for row in text.splitlines() if 'not captured' in row and name in row
    )
    assert 'fallback' in line
  # The fallback's update: momentum SGD at the reduced rate, unchanged.
  updates, _ = tx.update(grads, tx.init(params), params, frog_stats=stats)
  np.testing.assert_allclose(updates['tied'], -0.1 * 0.25 * grads['tied'])


def test_a_refused_kernel_module_goes_to_the_fallback_whole():
  key = jax.random.key(14)
  params = {
    'proj': {'kernel': jax.random.normal(key, (4, 4)), 'bias': jnp.ones(4)}
  }
  x = jax.random.normal(jax.random.key(15), (B, 4))

  def loss_fn(p, x):
    k = p['proj']['kernel']
    return (jnp.tanh(x @ k + p['proj']['bias']) @ k).sum()  # tied

  _, _, stats = fo.jax.value_and_grad(loss_fn, sample_size=S)(params, x)
  assert isinstance(stats['proj'], fo.UncapturedLayer)
  layouts = fo.jax.layouts(loss_fn, params, x)
  labels = fo.frog_param_labels(params, layouts=layouts)
  assert labels == {'proj': {'kernel': 'fallback', 'bias': 'fallback'}}


def test_stats_at_kernel_leaves_without_layouts_are_an_error():
  params = {'w': jnp.ones((4, 3))}
  x = jnp.ones((B, 4))
  loss_fn = lambda p, x: jnp.tanh(x @ p['w']).sum()
  _, grads, stats = fo.jax.value_and_grad(loss_fn, sample_size=S)(params, x)
  tx = fo.frog(0.1)
  with pytest.raises(ValueError, match=r"\['w'\].*layouts=fo.jax.layouts"):
    tx.update(grads, tx.init(params), params, frog_stats=stats)


def test_bias_added_across_the_wrong_axis_is_not_the_bias():
  params = {'w': jnp.ones((4, 3)), 'b': jnp.ones(B)}
  x = jnp.ones((B, 4))
  # b has one entry per example, not per output row.
  loss_fn = lambda p, x: jnp.tanh(x @ p['w'] + p['b'][:, None]).sum()
  _, _, stats = fo.jax.value_and_grad(loss_fn, sample_size=S)(params, x)
  assert stats['w'].layout.bias_path is None
  assert isinstance(stats['b'], fo.UncapturedLayer)


def test_bad_arguments():
  with pytest.raises(ValueError, match='sample_size'):
    fo.jax.value_and_grad(lambda p: p, sample_size=0)
  with pytest.raises(ValueError, match='argnums'):
    fo.jax.value_and_grad(lambda p: p, argnums=(0, 1), sample_size=2)


def test_the_guide_example_runs_and_captures_every_linear():
  import pathlib  # noqa: PLC0415
  import re  # noqa: PLC0415

  guide = pathlib.Path(__file__).resolve().parents[1] / 'docs/guides/any_jax.md'
  (code,) = re.findall(r'```python\n(.*?)```', guide.read_text(), re.S)
  scope = {}
  exec(code, scope)  # noqa: S102
  labels = fo.frog_param_labels(scope['params'], layouts=scope['tx'].layouts)
  assert set(jax.tree.leaves(labels)) == {'frog'}


def test_axis_name_gathers_the_samples_of_every_replica():
  key = jax.random.key(16)
  params = {'w': jax.random.normal(key, (4, 3)), 'b': jnp.zeros(3)}
  x = jax.random.normal(jax.random.key(17), (2, B, 4))  # 2 replicas
  loss_fn = lambda p, x: jnp.tanh(x @ p['w'] + p['b']).mean()

  def replica(x):
    _, _, stats = fo.jax.value_and_grad(
      loss_fn, sample_size=S, axis_name='data'
    )(params, x)
    return stats['w']

  gathered = jax.vmap(replica, axis_name='data')(x)
  each = [
    fo.jax.value_and_grad(loss_fn, sample_size=S)(params, x[r])[2]['w']
    for r in range(2)
  ]
  for r in range(2):  # every replica holds both samples, in replica order
    chex.assert_trees_all_close(
      gathered.inputs[r], jnp.concatenate([e.inputs for e in each])
    )
    chex.assert_trees_all_close(
      gathered.output_grads[r],
      jnp.concatenate([e.output_grads for e in each]),
    )


def test_scan_over_stacked_layers_matches_the_unrolled_layers():
  key = jax.random.key(18)
  k = jax.random.split(key, 3)
  stacked = {
    'k': 0.5 * jax.random.normal(k[0], (3, 4, 4)),
    'b': 0.1 * jax.random.normal(k[1], (3, 4)),
  }
  x = jax.random.normal(k[2], (B, 4))

  def scanned(p, x):
    body = lambda h, w: (jnp.tanh(h @ w['k'] + w['b']), None)
    return jnp.sin(jax.lax.scan(body, x, p)[0]).sum()

  def unrolled(p, x):
    for i in range(3):
      x = jnp.tanh(x @ p[f'k{i}'] + p[f'b{i}'])
    return jnp.sin(x).sum()

  layers = {f'{n}{i}': stacked[n][i] for n in ('k', 'b') for i in range(3)}
  _, stats, update, layouts = _ours(scanned, stacked, x)
  _, want_stats, want_update, _ = _ours(unrolled, layers, x)
  assert stats['k'].layout == fo.ParamLayout(stacked_axes=1, bias_path='b')
  assert layouts['k'].stacked_axes == 1
  for i in range(3):
    got = stats['k']
    want = want_stats[f'k{i}']
    chex.assert_trees_all_close(got.inputs[i], want.inputs, rtol=1e-12)
    chex.assert_trees_all_close(
      got.output_grads[i], want.output_grads, rtol=1e-12
    )
    for n in ('k', 'b'):
      chex.assert_trees_all_close(
        update[n][i], want_update[f'{n}{i}'], rtol=1e-10
      )


def test_a_leaf_belongs_to_one_layer():
  # `proj` looks like a Flax module dict, but its bias is another leaf's.
  params = {
    'proj': {'kernel': jnp.ones((4, 3)), 'bias': jnp.ones(3)},
    'shift': jnp.zeros(3),
  }
  x = jnp.ones((B, 4))

  def loss_fn(p, x):
    return jnp.tanh(x @ p['proj']['kernel'] + p['shift']).sum() + jnp.sum(
      p['proj']['bias']
    )

  layouts = fo.jax.layouts(loss_fn, params, x)
  table = fo._src.routing.layer_table(params, layouts)  # noqa: SLF001
  assert table == {'proj/kernel': {'kernel': 'proj/kernel', 'bias': 'shift'}}
  labels = fo.frog_param_labels(params, layouts=layouts)
  assert labels == {
    'proj': {'kernel': 'frog', 'bias': 'fallback'},
    'shift': 'frog',
  }
