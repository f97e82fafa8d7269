"""Flax NNX capture: the same stats and updates as linen on the same network."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import frog_optax as fo

BATCH = 6


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3), strides=2, name='conv')(x))
    x = x.mean(axis=(1, 2))
    x = nn.relu(nn.Dense(4, name='hidden')(x))
    return nn.Dense(3, name='head')(x)


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 3, (3, 3), strides=2, rngs=rngs)
    self.hidden = nnx.Linear(3, 4, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv(x))
    x = x.mean(axis=(1, 2))
    x = nnx.relu(self.hidden(x))
    return self.head(x)


def _data():
  x = jax.random.normal(jax.random.key(0), (BATCH, 7, 7, 2), jnp.float64)
  labels = jnp.arange(BATCH) % 3
  return x, labels


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _twin_models():
  """A linen net and an NNX net holding the same float64 parameters."""
  x, _ = _data()
  linen_model = LinenNet()
  params = linen_model.init(jax.random.key(1), x)['params']
  params = jax.tree.map(
    lambda a: jax.random.normal(jax.random.key(2), a.shape, jnp.float64),
    params,
  )
  nnx_model = NnxNet(nnx.Rngs(0))
  nnx.update(nnx_model, nnx.State(params))
  return linen_model, params, nnx_model


def test_nnx_and_linen_give_the_same_stats_and_update():
  x, labels = _data()
  linen_model, params, nnx_model = _twin_models()
  apply_fn = fo.linen.capture(linen_model.apply)
  linen_loss = lambda p: _cross_entropy(apply_fn({'params': p}, x), labels)
  loss, grads, stats = fo.linen.value_and_grad(linen_loss, sample_size=3)(
    params
  )
  tx = fo.frog(0.1, damping=1e-3, cg_iters=3, exclude='head')
  updates, _ = tx.update(grads, tx.init(params), params, frog_stats=stats)
  want_params = optax.apply_updates(params, updates)

  nnx_loss = lambda model: _cross_entropy(model(x), labels)
  n_loss, n_grads, n_stats = fo.nnx.value_and_grad(nnx_loss, sample_size=3)(
    nnx_model
  )
  np.testing.assert_allclose(n_loss, loss, rtol=1e-13)
  for name in ('conv', 'hidden', 'head'):
    for field in ('inputs', 'output_grads'):
      np.testing.assert_allclose(
        getattr(n_stats[name], field), getattr(stats[name], field), rtol=1e-12
      )
    assert n_stats[name].geometry == stats[name].geometry
  optimizer = nnx.Optimizer(
    nnx_model,
    fo.frog(0.1, damping=1e-3, cg_iters=3, exclude='head'),
    wrt=nnx.Param,
  )
  optimizer.update(nnx_model, n_grads, frog_stats=n_stats)
  chex.assert_trees_all_close(
    nnx.to_pure_dict(nnx.state(nnx_model, nnx.Param)), want_params, rtol=1e-10
  )


class WithState(nnx.Module):
  def __init__(self, rngs):
    self.shared = nnx.Linear(3, 3, rngs=rngs)
    self.norm = nnx.BatchNorm(3, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(3, 2, rngs=rngs)])

  def __call__(self, x):
    x = self.shared(nnx.relu(self.shared(x)))
    x = self.drop(self.norm(x))
    return self.layers[0](x)


def test_value_grads_and_state_updates_equal_nnx_value_and_grad():
  x = jax.random.normal(jax.random.key(0), (BATCH, 3), jnp.float32)
  ours_model = WithState(nnx.Rngs(0, dropout=1))
  theirs_model = nnx.clone(ours_model)
  loss_fn = lambda model, x: (jnp.mean(model(x) ** 2), model(x).sum())
  value, grads, stats = fo.nnx.value_and_grad(
    loss_fn, sample_size=2, has_aux=True
  )(ours_model, x)
  want_value, want_grads = nnx.value_and_grad(loss_fn, has_aux=True)(
    theirs_model, x
  )
  chex.assert_trees_all_equal((value, grads), (want_value, want_grads))
  # BatchNorm statistics and dropout RNG counters advanced the same way.
  chex.assert_trees_all_equal(nnx.state(ours_model), nnx.state(theirs_model))
  # `shared` is called twice per forward, twice per loss evaluation (the aux
  # calls the model again): rows of all four calls are concatenated.
  assert stats['shared'].inputs.shape == (4 * 2, 3)
  assert stats['layers'][0].output_grads.shape == (2 * 2, 2)
  assert stats['norm'] == {'scale': None, 'bias': None}
  # Outside value_and_grad the layers are the stock ones again.
  assert not hasattr(nnx.Linear.__call__, '__wrapped__')


def test_jitted_train_step_with_nnx_optimizer():
  x, labels = _data()
  _, _, model = _twin_models()
  eager_model = nnx.clone(model)
  tx = fo.frog(0.05, damping=1e-3, exclude='head')

  def step(model, optimizer):
    loss_fn = lambda model: _cross_entropy(model(x), labels)
    loss, grads, stats = fo.nnx.value_and_grad(loss_fn, sample_size=3)(model)
    optimizer.update(model, grads, frog_stats=stats)
    return loss

  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  eager_optimizer = nnx.Optimizer(eager_model, tx, wrt=nnx.Param)
  jitted = nnx.jit(step)
  losses = [float(jitted(model, optimizer)) for _ in range(3)]
  eager = [float(step(eager_model, eager_optimizer)) for _ in range(3)]
  np.testing.assert_allclose(losses, eager, rtol=1e-7)
  assert losses[-1] < losses[0]
  chex.assert_trees_all_close(
    nnx.state(model, nnx.Param), nnx.state(eager_model, nnx.Param), rtol=1e-6
  )


def test_patch_is_undone_when_the_loss_raises():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

  def loss_fn(model):
    model(jnp.ones((4, 3)))
    raise RuntimeError('boom')

  with pytest.raises(RuntimeError, match='boom'):
    fo.nnx.value_and_grad(loss_fn, sample_size=2)(model)
  assert not hasattr(nnx.Linear.__call__, '__wrapped__')
  assert not hasattr(nnx.Conv.__call__, '__wrapped__')


def test_patch_restores_the_saved_call_after_foreign_wrappers():
  original = nnx.Linear.__call__
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

  def loss_fn(model):
    # Another library wraps the (patched) method during the capture.
    inner = nnx.Linear.__call__
    nnx.Linear.__call__ = functools.wraps(inner)(
      lambda self, *a, **k: inner(self, *a, **k)
    )
    return model(jnp.ones((4, 3))).sum()

  try:
    fo.nnx.value_and_grad(loss_fn, sample_size=2)(model)
    assert nnx.Linear.__call__ is original
    # Later captures still work.
    _, _, stats = fo.nnx.value_and_grad(
      lambda m: m(jnp.ones((4, 3))).sum(), sample_size=2
    )(model)
    assert stats.inputs.shape == (2, 3)
  finally:
    nnx.Linear.__call__ = original


def test_a_layer_the_capture_refuses_is_recorded_with_its_reason():
  class Masked(nnx.Module):
    def __init__(self, rngs):
      mask = jnp.ones((3, 3, 2, 3))
      self.masked = nnx.Conv(2, 3, (3, 3), mask=mask, rngs=rngs)
      self.plain = nnx.Conv(3, 2, (3, 3), rngs=rngs)

    def __call__(self, x):
      return self.plain(self.masked(x)).sum()

  model = Masked(nnx.Rngs(0))
  x = jnp.ones((2, 5, 5, 2))
  loss, grads, stats = fo.nnx.value_and_grad(lambda m: m(x), sample_size=2)(
    model
  )
  want_loss, want_grads = nnx.value_and_grad(lambda m: m(x))(model)
  assert loss == want_loss
  chex.assert_trees_all_equal(grads, want_grads)
  assert stats['masked'] == fo.UncapturedLayer(
    'Conv', 'masked kernels are not supported'
  )
  assert isinstance(stats['plain'], fo.LayerStats)
  assert not any('frog' in name for name in vars(model.masked))  # no traces


def test_describe_accepts_the_model():
  x, labels = _data()
  _, _, model = _twin_models()
  _, _, stats = fo.nnx.value_and_grad(
    lambda m: _cross_entropy(m(x), labels), sample_size=3
  )(model)
  table = fo.nnx.describe(model, stats, exclude='head')
  lines = {line.split()[0]: line for line in table.splitlines()[2:]}
  assert 'frog' in lines['conv'] and ' 19 ' in lines['conv']  # 3·3·2 + 1
  assert 'excluded' in lines['head']


def test_describe_shows_the_routing_of_the_optimizer():
  x, labels = _data()
  _, _, model = _twin_models()
  _, _, stats = fo.nnx.value_and_grad(
    lambda m: _cross_entropy(m(x), labels), sample_size=3
  )(model)
  optimizer = nnx.Optimizer(model, fo.frog(0.1, exclude='head'), wrt=nnx.Param)
  for routing in (optimizer, optimizer.tx):
    table = fo.nnx.describe(model, stats, routing)
    lines = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert 'fallback' in lines['head'] and 'excluded' in lines['head']
    assert 'frog' in lines['hidden']
  wrapped = optax.inject_hyperparams(fo.frog)(learning_rate=0.1)
  with pytest.raises(ValueError, match='pass the exclude'):
    fo.nnx.describe(model, stats, wrapped)


@pytest.mark.parametrize('sample_size', [0, 1.5])
def test_bad_sample_size(sample_size):
  with pytest.raises(ValueError, match='sample_size'):
    fo.nnx.value_and_grad(lambda m: m, sample_size=sample_size)


class DropoutNet(nnx.Module):
  """Flax's NNX MNIST pattern: dropout draws from an `nnx.Rngs` argument."""

  def __init__(self, rngs):
    self.hidden = nnx.Linear(4, 8, param_dtype=jnp.float64, rngs=rngs)
    self.dropout = nnx.Dropout(0.5)
    self.head = nnx.Linear(8, 3, param_dtype=jnp.float64, rngs=rngs)

  def __call__(self, x, rngs):
    return self.head(self.dropout(nnx.relu(self.hidden(x)), rngs=rngs))


def test_a_loss_taking_rngs_matches_nnx_value_and_grad():
  x, y = jnp.ones((BATCH, 4), jnp.float64), jnp.arange(BATCH) % 3
  loss_fn = lambda model, x, y, rngs: _cross_entropy(model(x, rngs), y)
  model, rngs = DropoutNet(nnx.Rngs(0)), nnx.Rngs(dropout=1)
  twin, twin_rngs = nnx.clone(model), nnx.clone(rngs)
  loss, grads, stats = fo.nnx.value_and_grad(loss_fn, sample_size=3)(
    model, x, y, rngs
  )
  want_loss, want_grads = nnx.value_and_grad(loss_fn)(twin, x, y, twin_rngs)
  chex.assert_trees_all_equal(
    (loss, nnx.to_pure_dict(grads)), (want_loss, nnx.to_pure_dict(want_grads))
  )
  # The stream advanced exactly as nnx.value_and_grad advances it.
  chex.assert_trees_all_equal(
    nnx.to_pure_dict(nnx.state(rngs)), nnx.to_pure_dict(nnx.state(twin_rngs))
  )
  assert int(rngs.dropout.count[...]) == 1
  assert stats['hidden'].inputs.shape == (3, 4)


# ----------------------------------------------------------------------------
# Every captured NNX layer against its linen twin (float64).

F64 = dict(param_dtype=jnp.float64)


class _Wrap(nn.Module):
  """A linen layer named `layer`, then a sum-pool and a fixed head."""

  layer: nn.Module

  @nn.compact
  def __call__(self, x):
    y = self.layer(x)
    return y.reshape(y.shape[0], -1)[:, :3] * 2.0


class _NnxWrap(nnx.Module):
  def __init__(self, layer):
    self.layer = layer

  def __call__(self, x):
    y = self.layer(x)
    return y.reshape(y.shape[0], -1)[:, :3] * 2.0


def _capture_twins(linen_model, nnx_model, x):
  """Both front ends on the same random float64 parameters and batch.

  Returns `(params, linen (grads, stats), nnx (grads, stats), nnx loss)`,
  after checking that every captured layer's stats agree to 1e-12.
  """
  labels = jnp.arange(x.shape[0]) % 3
  params = linen_model.init(jax.random.key(1), x)['params']
  params = jax.tree.map(
    lambda a: jax.random.normal(jax.random.key(2), a.shape, jnp.float64),
    params,
  )
  nnx.update(nnx_model, nnx.State(params))
  apply_fn = fo.linen.capture(linen_model.apply)
  _, grads, stats = fo.linen.value_and_grad(
    lambda p: _cross_entropy(apply_fn({'params': p}, x), labels),
    sample_size=3,
  )(params)
  nnx_loss = lambda m: _cross_entropy(m(x), labels)
  _, n_grads, n_stats = fo.nnx.value_and_grad(nnx_loss, sample_size=3)(
    nnx_model
  )
  flat = fo._src.paths.entries_by_path(stats, fo.LayerStats)
  n_flat = fo._src.paths.entries_by_path(n_stats, fo.LayerStats)
  assert set(n_flat) == set(flat) and flat
  for path, want in flat.items():
    got = n_flat[path]
    assert (got.geometry, got.layout) == (want.geometry, want.layout)
    chex.assert_trees_all_close(
      (got.inputs, got.output_grads),
      (want.inputs, want.output_grads),
      rtol=1e-12,
    )
  return params, (grads, stats), (n_grads, n_stats), nnx_loss


def _assert_same_frog_step(params, linen_out, nnx_model, step, rtol):
  """`step(model, optimizer)` moves the NNX model as linen's update moves."""
  grads, stats = linen_out
  tx = fo.frog(0.1, cg_iters=3)
  updates, _ = tx.update(grads, tx.init(params), params, frog_stats=stats)
  optimizer = nnx.Optimizer(nnx_model, fo.frog(0.1, cg_iters=3), wrt=nnx.Param)
  step(nnx_model, optimizer)
  chex.assert_trees_all_close(
    nnx.to_pure_dict(nnx.state(nnx_model, nnx.Param)),
    optax.apply_updates(params, updates),
    rtol=rtol,
  )


def _layer_pairs():
  rngs = nnx.Rngs(0)
  return {
    'linear_general_multi_axis': (
      nn.DenseGeneral((2, 3), axis=(-1, -2), **F64),
      nnx.LinearGeneral((3, 4), (2, 3), axis=(-1, -2), rngs=rngs, **F64),
      (BATCH, 3, 4),
    ),
    'einsum_heads': (
      nn.Einsum((4, 2, 3), 'btd,dhk->bthk', **F64),
      nnx.Einsum('btd,dhk->bthk', (4, 2, 3), (2, 3), rngs=rngs, **F64),
      (BATCH, 3, 4),
    ),
    'attention': (
      # The same attention function: linen's and NNX's differ by ~1e-6.
      nn.MultiHeadDotProductAttention(
        2, qkv_features=4, attention_fn=nnx.dot_product_attention, **F64
      ),
      nnx.MultiHeadAttention(
        2, 4, qkv_features=4, decode=False, rngs=rngs, **F64
      ),
      (BATCH, 3, 4),
    ),
    'conv_circular_groups_dilation': (
      nn.Conv(
        4,
        (3,),
        padding='CIRCULAR',
        feature_group_count=2,
        kernel_dilation=2,
        **F64,
      ),
      nnx.Conv(
        4,
        4,
        (3,),
        padding='CIRCULAR',
        feature_group_count=2,
        kernel_dilation=2,
        rngs=rngs,
        **F64,
      ),
      (BATCH, 6, 4),
    ),
    'conv_causal_strided': (
      nn.Conv(3, (2,), strides=2, padding='CAUSAL', use_bias=False, **F64),
      nnx.Conv(
        2,
        3,
        (2,),
        strides=2,
        padding='CAUSAL',
        use_bias=False,
        rngs=rngs,
        **F64,
      ),
      (BATCH, 6, 2),
    ),
  }


@pytest.mark.parametrize('name', list(_layer_pairs()))
def test_every_nnx_layer_matches_its_linen_twin(name):
  linen_layer, nnx_layer, x_shape = _layer_pairs()[name]
  x = jax.random.normal(jax.random.key(0), x_shape, jnp.float64)
  nnx_model = _NnxWrap(nnx_layer)
  params, linen_out, (n_grads, n_stats), _ = _capture_twins(
    _Wrap(linen_layer), nnx_model, x
  )
  _assert_same_frog_step(
    params,
    linen_out,
    nnx_model,
    lambda m, opt: opt.update(m, n_grads, frog_stats=n_stats),
    rtol=1e-10,
  )


def test_nnx_embed_falls_back():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(5, 4, rngs=rngs)
      self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, tokens):
      return self.head(self.embed(tokens)).mean(axis=1)

  model = Net(nnx.Rngs(0))
  tokens = jnp.arange(12).reshape(4, 3) % 5
  _, grads, stats = fo.nnx.value_and_grad(
    lambda m: m(tokens).sum(), sample_size=2
  )(model)
  assert stats['embed'] == {'embedding': None}
  assert stats['head'].inputs.shape == (6, 4)  # 2 examples × 3 tokens
  optimizer = nnx.Optimizer(model, fo.frog(0.1), wrt=nnx.Param)
  optimizer.update(model, grads, frog_stats=stats)
  table = fo.nnx.describe(model, stats, optimizer)
  row = next(line for line in table.splitlines() if 'embed' in line)
  assert 'fallback' in row


# ----------------------------------------------------------------------------
# Lifted transforms: layers inside nnx.scan and nnx.remat.

LAYERS = 3


class _LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return jnp.tanh(nn.Dense(4, name='lin', **F64)(x)), None


class _LinenStack(nn.Module):
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    block = nn.remat(_LinenBlock) if self.remat else _LinenBlock
    stack = nn.scan(
      block,
      variable_axes={
        'params': 0,
        fo.linen.INPUTS: 0,
        fo.linen.PERTURBATIONS: 0,
      },
      split_rngs={'params': True},
      length=LAYERS,
    )
    x, _ = stack(name='blocks')(x, None)
    return nn.Dense(3, name='head', **F64)(x)


class _NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(4, 4, rngs=rngs, **F64)

  def __call__(self, x):
    return jnp.tanh(self.lin(x))


class _NnxStack(nnx.Module):
  def __init__(self, rngs, remat=False):
    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return _NnxBlock(rngs)

    self.blocks = create(rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs, **F64)
    self.remat = remat

  def __call__(self, x):
    def body(x, block):
      return block(x)

    if self.remat:
      body = nnx.remat(body)
    x = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(
      x, self.blocks
    )
    return self.head(x)


@pytest.mark.parametrize('remat', [False, True], ids=['scan', 'scan_remat'])
def test_nnx_scan_and_remat_match_linen(remat):
  x = jax.random.normal(jax.random.key(0), (BATCH, 4), jnp.float64)
  nnx_model = _NnxStack(nnx.Rngs(0), remat)
  params, linen_out, (_, n_stats), loss_fn = _capture_twins(
    _LinenStack(remat), nnx_model, x
  )
  n_lin = n_stats['blocks']['lin']
  assert n_lin.inputs.shape == (LAYERS, 3, 4)
  assert n_lin.layout.stacked_axes == 1
  # The model keeps no capture state, and a jitted step gives the same.
  assert not [
    n for _, m in nnx.iter_modules(nnx_model) for n in vars(m) if 'frog' in n
  ]

  @nnx.jit
  def step(model, optimizer):
    _, grads, stats = fo.nnx.value_and_grad(loss_fn, sample_size=3)(model)
    optimizer.update(model, grads, frog_stats=stats)

  _assert_same_frog_step(params, linen_out, nnx_model, step, rtol=1e-9)


MEMBERS = 2


class _LinenEnsemble(nn.Module):
  @nn.compact
  def __call__(self, x):
    members = nn.vmap(
      lambda module, x: module(x),
      variable_axes={
        'params': 0,
        fo.linen.INPUTS: 0,
        fo.linen.PERTURBATIONS: 0,
      },
      split_rngs={'params': True},
      in_axes=None,
      axis_size=MEMBERS,
    )
    return members(nn.Dense(3, name='member', **F64), x).mean(axis=0)


class _NnxEnsemble(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=MEMBERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return nnx.Linear(4, 3, rngs=rngs, **F64)

    self.member = create(rngs)

  def __call__(self, x):
    run = nnx.vmap(lambda member, x: member(x), in_axes=(0, None))
    return run(self.member, x).mean(axis=0)


def test_nnx_vmap_matches_linen():
  x = jax.random.normal(jax.random.key(0), (BATCH, 4), jnp.float64)
  _, _, (_, n_stats), _ = _capture_twins(
    _LinenEnsemble(), _NnxEnsemble(nnx.Rngs(0)), x
  )
  assert n_stats['member'].layout.stacked_axes == 1


class MnistStyleCnn(nnx.Module):
  """Flax's NNX MNIST example's pattern: the dropout Rngs live in the model."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs, **F64)
    self.norm = nnx.BatchNorm(4, rngs=rngs, dtype=jnp.float64, **F64)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs, **F64)

  def __call__(self, x):
    x = nnx.relu(self.norm(self.conv(x)))
    return self.head(self.dropout(x.mean(axis=(1, 2))))


def test_model_owned_rngs_dropout_and_batchnorm_as_nnx_value_and_grad():
  x, labels = _data()
  loss_fn = lambda model: _cross_entropy(model(x), labels)
  model = MnistStyleCnn(nnx.Rngs(0))
  twin = nnx.clone(model)
  loss, grads, stats = fo.nnx.value_and_grad(loss_fn, sample_size=3)(model)
  want_loss, want_grads = nnx.value_and_grad(loss_fn)(twin)
  chex.assert_trees_all_equal(
    (loss, nnx.to_pure_dict(grads)), (want_loss, nnx.to_pure_dict(want_grads))
  )
  # BatchNorm statistics and the dropout stream advanced identically.
  chex.assert_trees_all_equal(
    nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(twin))
  )
  assert stats['conv'].inputs.shape == (3, 7, 7, 2)
