"""Flax linen capture: same value and grads, correct stats, loud refusals."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import frog_optax as fo

import models


@pytest.mark.parametrize('jit', [False, True])
def test_value_and_grads_identical_to_jax(jit):
  model, variables, x, y = models.setup()
  loss_fn = models.make_loss(model)
  args = (variables['params'], variables['batch_stats'], x, y)
  ours = fo.linen.value_and_grad(loss_fn, sample_size=4, has_aux=True)
  theirs = jax.value_and_grad(loss_fn, has_aux=True)
  if jit:
    ours, theirs = jax.jit(ours), jax.jit(theirs)
  value, grads, _ = ours(*args)
  want_value, want_grads = theirs(*args)
  # Adding zeros to the sampled outputs changes no bit of the computation.
  chex.assert_trees_all_equal((value, grads), (want_value, want_grads))


def test_full_sample_transpose_reproduces_kernel_gradient():
  model, variables, x, y = models.setup(jnp.float64)
  loss_fn = models.make_loss(model)
  _, grads, stats = fo.linen.value_and_grad(
    loss_fn, sample_size=None, has_aux=True
  )(variables['params'], variables['batch_stats'], x, y)
  for name in ('Conv_0', 'Conv_1', 'head'):
    st = stats[name]
    assert st.inputs.shape[0] == models.BATCH
    transpose = st.geometry.transpose(st.inputs, grads[name])
    # output_grads carry a factor B (mean-reduced loss).
    got = jax.tree.map(lambda g: g / models.BATCH, transpose(st.output_grads))
    chex.assert_trees_all_close(got, grads[name], rtol=1e-10, atol=1e-14)


def test_stats_tree_is_a_params_prefix():
  params, _, stats = models.grads_and_stats()
  assert isinstance(stats['Conv_0'], fo.LayerStats)
  assert stats['BatchNorm_0'] == {'scale': None, 'bias': None}
  assert stats['Conv_0'].inputs.shape == (4, 6, 6, 2)  # strided rows 0,2,4,6
  assert stats['head'].inputs.shape == (4, 4)
  # A pytree: jit in and out.
  out = jax.jit(lambda s: s)(stats)
  chex.assert_trees_all_equal(out['Conv_1'].inputs, stats['Conv_1'].inputs)
  assert out['Conv_1'].geometry == stats['Conv_1'].geometry
  del params


class OneLayer(nn.Module):
  layer: nn.Module

  @nn.compact
  def __call__(self, x):
    return self.layer(x)


LAYERS = {
  'dense_3d': (nn.Dense(3), (4, 5, 2)),
  'dense_nobias': (nn.Dense(3, use_bias=False), (4, 2)),
  'conv_same_stride': (nn.Conv(3, (3, 3), strides=2), (4, 7, 6, 2)),
  'conv_valid': (nn.Conv(3, (2, 3), padding='VALID'), (4, 5, 6, 2)),
  'conv_explicit': (nn.Conv(3, (3,), padding=((2, 1),)), (4, 7, 2)),
  'conv_int_padding': (nn.Conv(3, (3, 3), padding=1), (4, 5, 5, 2)),
  'conv_circular': (nn.Conv(3, (3, 3), padding='CIRCULAR'), (4, 5, 5, 2)),
  'conv_reflect': (
    nn.Conv(3, (3, 3), padding='REFLECT', kernel_dilation=2),
    (4, 6, 6, 2),
  ),
  'conv_causal': (
    nn.Conv(3, (3,), padding='CAUSAL', kernel_dilation=2),
    (4, 8, 2),
  ),
  # lax refuses string padding with input dilation: explicit pairs.
  'conv_dilations': (
    nn.Conv(
      4,
      (3, 3),
      input_dilation=(2, 1),
      kernel_dilation=(1, 2),
      strides=(1, 2),
      padding=((1, 2), (0, 1)),
    ),
    (4, 4, 7, 2),
  ),
  'conv_groups': (nn.Conv(4, (3, 3), feature_group_count=2), (4, 5, 5, 4)),
  'conv_depthwise': (
    nn.Conv(6, (3, 3), feature_group_count=3, use_bias=False),
    (4, 5, 5, 3),
  ),
  'conv_3d': (nn.Conv(2, (2, 2, 2), strides=(1, 2, 1)), (4, 3, 4, 3, 2)),
  'conv_two_batch_axes': (nn.Conv(3, (3,)), (4, 2, 6, 2)),
}


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_captured_linear_map_reproduces_module(name):
  layer, shape = LAYERS[name]
  model = OneLayer(layer)
  x = jax.random.normal(jax.random.key(0), shape, jnp.float64)
  params = model.init(jax.random.key(1), x)['params']
  params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
  apply_fn = fo.linen.capture(model.apply)
  loss_fn = lambda p: jnp.sum(jnp.sin(apply_fn({'params': p}, x)))
  _, _, stats = fo.linen.value_and_grad(loss_fn, sample_size=2)(params)
  st = stats['layer']
  y = model.apply({'params': params}, x)[::2]  # strided rows 0 and 2
  y = y.reshape((-1,) + st.output_grads.shape[1:])
  got = st.geometry.forward(st.inputs, params['layer'])
  np.testing.assert_allclose(got, y, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(st.output_grads, 4 * jnp.cos(y), rtol=1e-10)


def test_random_subsample_with_key():
  model, variables, x, y = models.setup()
  loss_fn = models.make_loss(model)
  args = (variables['params'], variables['batch_stats'], x, y)
  key = jax.random.key(7)
  _, _, stats = fo.linen.value_and_grad(
    loss_fn, sample_size=3, has_aux=True, rng=key
  )(*args)
  rows = jnp.sort(jax.random.choice(key, models.BATCH, (3,), replace=False))
  np.testing.assert_array_equal(stats['Conv_0'].inputs, x[rows])
  # The same rows in every layer: the head sees the pooled features of `rows`.
  _, _, stats_all = fo.linen.value_and_grad(
    loss_fn, sample_size=None, has_aux=True
  )(*args)
  np.testing.assert_allclose(
    stats['head'].inputs, stats_all['head'].inputs[rows], rtol=1e-6
  )


class Nested(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.remat(nn.Dense)(4, name='checkpointed')(x)
    shared = nn.Dense(4, name='shared')
    x = shared(nn.relu(shared(x)))
    return Block(name='block')(x).sum(-1)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(x)


def test_nested_remat_and_shared_modules():
  model = Nested()
  x = jax.random.normal(jax.random.key(0), (6, 4), jnp.float64)
  params = model.init(jax.random.key(1), x)['params']
  params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
  apply_fn = fo.linen.capture(model.apply)
  loss_fn = lambda p: jnp.mean(apply_fn({'params': p}, x) ** 2)
  loss, grads, stats = jax.jit(
    fo.linen.value_and_grad(loss_fn, sample_size=None)
  )(params)
  want_loss, want_grads = jax.value_and_grad(loss_fn)(params)
  chex.assert_trees_all_close(
    (loss, grads), (want_loss, want_grads), rtol=1e-12
  )
  assert set(fo._src.paths.entries_by_path(stats, fo.LayerStats)) == {
    'checkpointed',
    'shared',
    'block/Dense_0',
  }
  # Two call sites of `shared`: rows concatenated, and together they still
  # reproduce the full gradient (output gradients carry one factor for
  # both calls, their total batch size 6 + 6).
  st = stats['shared']
  assert st.inputs.shape == (12, 4)
  transpose = st.geometry.transpose(st.inputs, grads['shared'])
  got = jax.tree.map(lambda g: g / 12, transpose(st.output_grads))
  chex.assert_trees_all_close(got, grads['shared'], rtol=1e-10)


def test_capture_outside_value_and_grad_is_plain_apply():
  model, variables, x, _ = models.setup()
  apply_fn = fo.linen.capture(model.apply)
  chex.assert_trees_all_equal(
    apply_fn(variables, x, train=False), model.apply(variables, x, train=False)
  )
  out = apply_fn(variables, x, mutable=['batch_stats'])
  assert isinstance(out, tuple) and set(out[1]) == {'batch_stats'}


def test_user_mutable_forms_are_returned_as_flax_does():
  model = OneLayer(nn.Dense(2))
  x = jnp.ones((4, 3))
  params = model.init(jax.random.key(0), x)['params']
  apply_fn = fo.linen.capture(model.apply)
  seen = {}

  def loss_fn(p):
    out, state = apply_fn({'params': p}, x, mutable=[])
    seen['state'] = state
    return out.sum()

  fo.linen.value_and_grad(loss_fn, sample_size=2)(params)
  assert seen['state'] == {}


MASKED = 'masked kernels are not supported'


def test_a_layer_the_capture_refuses_goes_to_the_fallback_when_excluded():
  mask = jnp.ones((3, 3, 2, 3))

  class Masked(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(3, (3, 3), mask=mask, name='masked')(x)
      return nn.Conv(2, (3, 3), name='plain')(x).sum()

  model = Masked()
  x = jnp.ones((2, 5, 5, 2))
  params = model.init(jax.random.key(0), x)['params']
  apply_fn = fo.linen.capture(model.apply)
  loss_fn = lambda p: apply_fn({'params': p}, x)
  loss, grads, stats = fo.linen.value_and_grad(loss_fn, sample_size=2)(params)
  want_loss, want_grads = jax.value_and_grad(loss_fn)(params)
  assert loss == want_loss
  chex.assert_trees_all_equal(grads, want_grads)
  assert stats['masked'] == fo.UncapturedLayer('Conv', MASKED)
  assert isinstance(stats['plain'], fo.LayerStats)
  tx = fo.frog(0.1)
  with pytest.raises(ValueError, match=rf"'masked' \(Conv: {MASKED}\)") as e:
    tx.update(grads, tx.init(params), params, frog_stats=stats)
  assert "exclude=('masked',)" in str(e.value)
  assert 'It captures' not in str(e.value)  # the type is captured
  tx = fo.frog(0.1, exclude='masked')  # the advice works
  updates, _ = tx.update(grads, tx.init(params), params, frog_stats=stats)
  # The fallback's first step: momentum SGD at 0.25 x the learning rate.
  chex.assert_trees_all_close(
    updates['masked'], jax.tree.map(lambda g: -0.025 * g, grads['masked'])
  )

  # A layer the capture does not know is not silently skipped.
  class Transposed(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.ConvTranspose(2, (3, 3))(nn.Conv(2, (3, 3))(x)).sum()

  model = Transposed()
  params = model.init(jax.random.key(0), x)['params']
  apply_fn = fo.linen.capture(model.apply)
  _, grads, stats = fo.linen.value_and_grad(
    lambda p: apply_fn({'params': p}, x), sample_size=2
  )(params)
  tx = fo.frog(0.1)
  with pytest.raises(ValueError, match=r"'ConvTranspose_0' \(ConvTranspose:"):
    tx.update(grads, tx.init(params), params, frog_stats=stats)
  tx = fo.frog(0.1, exclude='ConvTranspose_0')
  updates, _ = tx.update(grads, tx.init(params), params, frog_stats=stats)
  assert np.all(np.isfinite(updates['ConvTranspose_0']['kernel']))


def test_unbatched_inputs_are_not_captured():
  model = OneLayer(nn.Dense(2))
  x = jnp.ones((3,))
  params = model.init(jax.random.key(0), x)['params']
  apply_fn = fo.linen.capture(model.apply)
  _, _, stats = fo.linen.value_and_grad(
    lambda p: apply_fn({'params': p}, x).sum(), sample_size=2
  )(params)
  assert stats['layer'].layer_type == 'Dense'
  assert 'no batch axis' in stats['layer'].reason


@pytest.mark.parametrize('sample_size', [0, -3, 2.5])
def test_bad_sample_size(sample_size):
  with pytest.raises(ValueError, match='sample_size'):
    fo.linen.value_and_grad(lambda p: p, sample_size=sample_size)


def test_describe_table():
  params, _, stats = models.grads_and_stats(sample_size=2)
  table = fo.describe(params, stats, exclude=('head',))
  lines = {line.split()[0]: line for line in table.splitlines()[2:]}
  assert 'frog' in lines['Conv_0'] and ' 19 ' in lines['Conv_0']  # 3·3·2+1
  assert 'excluded' in lines['head']
  assert 'not a Dense/Conv kernel' in lines['BatchNorm_0']
  table = fo.linen.describe(params, stats)
  head = next(line for line in table.splitlines() if line.startswith('head'))
  assert 'rank-deficient' in head  # 2 samples < D = 5
  no_stats = fo.describe(params, dict(stats, Conv_1=None))
  assert 'ERROR' in no_stats


def test_train_state_forwards_frog_stats():
  model, variables, x, y = models.setup()
  tx = fo.frog(0.1, exclude='head')
  state = fo.linen.TrainState.create(
    apply_fn=model.apply, params=variables['params'], tx=tx
  )
  loss_fn = models.make_loss(model)
  _, grads, stats = fo.linen.value_and_grad(
    loss_fn, sample_size=4, has_aux=True
  )(state.params, variables['batch_stats'], x, y)
  new_state = state.apply_gradients(grads=grads, frog_stats=stats)
  updates, _ = tx.update(
    grads, tx.init(state.params), state.params, frog_stats=stats
  )
  chex.assert_trees_all_close(
    new_state.params, optax.apply_updates(state.params, updates)
  )
  assert int(new_state.step) == 1
