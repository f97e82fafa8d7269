"""No silent failures on real models: dead units, loss scales, shared layers,
layer orders, bad inputs and non-finite values."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import frog_optax as fo


def _finite(tree):
  return all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(tree))


def _cross_entropy(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# ----------------------------------------------------------------------------
# Dead units: a row whose Fisher has zero trace.


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.float64])
def test_zero_trace_rows_get_their_normalised_momentum(dtype):
  # A grouped conv without bias whose first group sees only zeros (a dead
  # ReLU channel before it), with large output gradients.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 5, 5, 4))
  x[..., :2] = 0.0  # group 0 = input channels 0-1
  geometry = fo.ConvGeometry((1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 2)
  stats = fo.LayerStats(
    jnp.asarray(x, dtype),
    jnp.asarray(30 * rng.normal(size=(4, 5, 5, 4)), dtype),
    geometry,
  )
  m = {'kernel': jnp.asarray(rng.normal(size=(3, 3, 2, 4)), dtype)}
  damping = 1e-3
  step = jax.jit(
    lambda s, m: fo.precondition_layer(
      s, m, damping=damping, cg_iters=4, eps=1e-10
    )
  )
  u = step(stats, m)['kernel']
  assert u.dtype == dtype
  assert bool(jnp.all(jnp.isfinite(u)))
  rows = np.asarray(m['kernel'], np.float64).reshape(-1, 4)
  want = rows / np.linalg.norm(rows, axis=0) / np.sqrt(1 + damping)
  got = np.asarray(u, np.float64).reshape(-1, 4)
  np.testing.assert_allclose(got[:, :2], want[:, :2], rtol=1e-5)


def test_a_dead_layer_gets_a_finite_update_in_training():
  # Every unit of the first layer is dead, so the second (bias-free) layer
  # sees only zeros; its gradient is exactly zero and so is its update.
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(8, bias_init=nn.initializers.constant(-1e3))(x))
      x = nn.Dense(8, use_bias=False)(x)
      return nn.Dense(3, name='head')(x)

  model = Net()
  x = 10 * jax.random.normal(jax.random.key(0), (16, 4), jnp.float32)
  y = jnp.arange(16) % 3
  params = model.init(jax.random.key(1), x)['params']
  apply_fn = fo.linen.capture(model.apply)
  loss_fn = lambda p: 1e4 * _cross_entropy(apply_fn({'params': p}, x), y)
  _, grads, stats = fo.linen.value_and_grad(loss_fn, sample_size=8)(params)
  tx = fo.frog(0.1)
  updates, _ = jax.jit(lambda g, s, p, st: tx.update(g, s, p, frog_stats=st))(
    grads, tx.init(params), params, stats
  )
  assert _finite(updates)
  assert float(jnp.abs(updates['Dense_1']['kernel']).max()) == 0.0


# ----------------------------------------------------------------------------
# Loss scale.


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(6)(x))
    x = nn.tanh(nn.Dense(6)(x))
    return nn.Dense(3)(x)


def _mlp_update(scale, tx):
  model = _Mlp()
  x = jax.random.normal(jax.random.key(0), (16, 5), jnp.float32)
  y = jnp.arange(16) % 3
  params = model.init(jax.random.key(1), x)['params']
  apply_fn = fo.linen.capture(model.apply)
  loss_fn = lambda p: scale * _cross_entropy(apply_fn({'params': p}, x), y)
  _, grads, stats = fo.linen.value_and_grad(loss_fn, sample_size=8)(params)
  u, _ = tx.update(grads, tx.init(params), params, frog_stats=stats)
  return u


def test_update_unchanged_from_tiny_to_huge_loss_scales_in_float32():
  tx = fo.scale_by_frog()
  base = _mlp_update(1.0, tx)
  for scale in (1e-5, 1e20, 1e30):
    u = _mlp_update(scale, tx)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(base)):
      assert a.dtype == jnp.float32
      assert bool(jnp.all(jnp.isfinite(a))), scale
      assert float(jnp.abs(a - b).max()) <= 1e-3 * float(jnp.abs(b).max())


# ----------------------------------------------------------------------------
# Capture: layer orders and shared layers.


def _update_of(model, x, y, params, sample_size=None):
  apply_fn = fo.linen.capture(model.apply)
  loss_fn = lambda p: _cross_entropy(apply_fn({'params': p}, x), y)
  _, grads, stats = fo.linen.value_and_grad(loss_fn, sample_size=sample_size)(
    params
  )
  tx = fo.scale_by_frog(damping=1e-2)
  return tx.update(grads, tx.init(params), frog_stats=stats)[0], grads


def test_dense_general_axis_order_does_not_change_the_update():
  # Flax sorts `axis` before building the kernel: both layers are the same.
  class Net(nn.Module):
    axis: tuple

    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral(
        3, axis=self.axis, name='proj', param_dtype=jnp.float64
      )(x)

  x = jax.random.normal(jax.random.key(0), (8, 3, 4), jnp.float64)
  y = jnp.arange(8) % 3
  params = Net((1, 2)).init(jax.random.key(1), x)['params']
  want, _ = _update_of(Net((1, 2)), x, y, params)
  got, _ = _update_of(Net((2, 1)), x, y, params)
  np.testing.assert_allclose(
    got['proj']['kernel'], want['proj']['kernel'], rtol=1e-9
  )


def test_shared_layer_on_two_batches_equals_one_call_on_both():
  class Once(nn.Module):
    @nn.compact
    def __call__(self, x1, x2):
      return nn.Dense(3, name='shared', param_dtype=jnp.float64)(
        jnp.concatenate([x1, x2])
      )

  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x1, x2):
      dense = nn.Dense(3, name='shared', param_dtype=jnp.float64)
      return jnp.concatenate([dense(x1), dense(x2)])

  k1, k2 = jax.random.split(jax.random.key(0))
  x1 = jax.random.normal(k1, (8, 5), jnp.float64)
  x2 = jax.random.normal(k2, (4, 5), jnp.float64)
  y = jnp.arange(12) % 3
  params = Once().init(jax.random.key(1), x1, x2)['params']

  def update(model):
    apply_fn = fo.linen.capture(model.apply)
    loss_fn = lambda p: _cross_entropy(apply_fn({'params': p}, x1, x2), y)
    _, grads, stats = fo.linen.value_and_grad(loss_fn, sample_size=None)(params)
    tx = fo.scale_by_frog(damping=1e-2)
    return tx.update(grads, tx.init(params), frog_stats=stats)[0], grads

  u_once, g_once = update(Once())
  u_twice, g_twice = update(Twice())
  np.testing.assert_allclose(
    g_twice['shared']['kernel'], g_once['shared']['kernel'], rtol=1e-10
  )
  for name in ('kernel', 'bias'):
    np.testing.assert_allclose(
      u_twice['shared'][name], u_once['shared'][name], rtol=1e-8
    )


# ----------------------------------------------------------------------------
# Errors that say what to do.


class _OneDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x)


def _dense_problem():
  model = _OneDense()
  x = jnp.ones((4, 5))
  params = model.init(jax.random.key(0), x)['params']
  apply_fn = fo.linen.capture(model.apply)
  return model, x, params, lambda p, x: apply_fn({'params': p}, x).sum()


def test_empty_batch_names_the_layer():
  _, _, params, loss_fn = _dense_problem()
  with pytest.raises(ValueError, match=r"Dense at 'Dense_0'.*empty batch"):
    fo.linen.value_and_grad(loss_fn, sample_size=2)(params, jnp.ones((0, 5)))
  model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"Linear at ''.*empty batch"):
    fo.nnx.value_and_grad(lambda m, x: m(x).sum(), sample_size=2)(
      model, jnp.ones((0, 5))
    )


def _stats(inputs, output_grads, geometry=None):
  return {
    'Dense_0': fo.LayerStats(
      jnp.asarray(inputs),
      jnp.asarray(output_grads),
      geometry or fo.DenseGeometry(),
    )
  }


def test_stats_of_other_widths_or_kinds_are_refused_by_name():
  params = {'Dense_0': {'kernel': jnp.ones((5, 3)), 'bias': jnp.zeros(3)}}
  tx = fo.scale_by_frog()
  state = tx.init(params)
  wrong_width = _stats(jnp.ones((4, 7)), jnp.ones((4, 3)))
  with pytest.raises(ValueError, match=r"'Dense_0'.*7 features.*expects 5"):
    tx.update(params, state, frog_stats=wrong_width)
  conv = fo.ConvGeometry((1, 1), ((0, 0), (0, 0)), (1, 1), (1, 1), 1)
  conv_stats = _stats(jnp.ones((2, 4, 4, 5)), jnp.ones((2, 4, 4, 3)), conv)
  with pytest.raises(ValueError, match=r"'Dense_0'.*2-D convolution"):
    tx.update(params, state, frog_stats=conv_stats)


def test_flax_train_state_is_named_in_the_missing_stats_error():
  model, x, params, loss_fn = _dense_problem()
  _, grads, stats = fo.linen.value_and_grad(loss_fn, sample_size=2)(params, x)
  state = train_state.TrainState.create(
    apply_fn=model.apply, params=params, tx=fo.frog(0.1)
  )
  with pytest.raises(ValueError, match='frog_optax.linen.TrainState'):
    state.apply_gradients(grads=grads, frog_stats=stats)
  state = fo.linen.TrainState.create(
    apply_fn=model.apply, params=params, tx=fo.frog(0.1)
  )
  assert int(state.apply_gradients(grads=grads, frog_stats=stats).step) == 1


def test_uncapturable_layer_type_is_named():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.ConvLocal(2, (3,), name='local')(x)
      return nn.Dense(3)(x.reshape(x.shape[0], -1))

  model = Net()
  x = jnp.ones((4, 6, 2))
  params = model.init(jax.random.key(0), x)['params']
  apply_fn = fo.linen.capture(model.apply)
  loss_fn = lambda p: apply_fn({'params': p}, x).sum()
  _, grads, stats = fo.linen.value_and_grad(loss_fn, sample_size=2)(params)
  assert stats['local'] == fo.UncapturedLayer('ConvLocal')
  tx = fo.frog(0.1)
  with pytest.raises(
    ValueError,
    match=r"did not capture these layers: 'local' \(ConvLocal: the capture"
    r' does not know this layer type\).*It captures nn.Dense',
  ) as error:
    tx.update(grads, tx.init(params), params, frog_stats=stats)
  assert 'linen.capture' not in str(error.value)
  tx = fo.frog(0.1, exclude='local')  # the advice works
  updates, _ = tx.update(grads, tx.init(params), params, frog_stats=stats)
  assert _finite(updates)


def test_uncapturable_nnx_layer_type_is_named():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.proj = nnx.ConvTranspose(2, 3, (3,), rngs=rngs)

    def __call__(self, x):
      return self.proj(x)

  model = Net(nnx.Rngs(0))
  _, grads, stats = fo.nnx.value_and_grad(
    lambda m, x: m(x).sum(), sample_size=2
  )(model, jnp.ones((4, 5, 2)))
  tx = fo.frog(0.1)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with pytest.raises(ValueError, match=r"'proj' \(ConvTranspose: "):
    tx.update(
      nnx.to_pure_dict(grads), tx.init(params), params, frog_stats=stats
    )


def test_integer_parameters_and_infinite_learning_rate_are_refused():
  params = {'Dense_0': {'kernel': jnp.ones((5, 3), jnp.int32)}}
  with pytest.raises(ValueError, match=r'Dense_0/kernel: int32'):
    fo.frog(0.1).init(params)
  with pytest.raises(ValueError, match=r'Dense_0/kernel: int32'):
    fo.scale_by_frog().init(params)
  with pytest.raises(ValueError, match='learning_rate must be in'):
    fo.frog(float('inf'))


# ----------------------------------------------------------------------------
# Non-finite values stay contained, or the step is skipped.


def test_a_nan_gradient_does_not_outlive_its_step_without_momentum():
  model, x, params, loss_fn = _dense_problem()
  _, grads, stats = fo.linen.value_and_grad(loss_fn, sample_size=2)(params, x)
  tx = fo.frog(0.1, momentum=0.0)
  state = tx.init(params)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
  updates, state = tx.update(bad, state, params, frog_stats=stats)
  assert not _finite(updates)  # this step's row is poisoned ...
  updates, state = tx.update(grads, state, params, frog_stats=stats)
  assert _finite(updates)  # ... the next step is not


def test_apply_if_finite_skips_steps_with_nan_stats():
  model, x, params, loss_fn = _dense_problem()
  _, grads, stats = fo.linen.value_and_grad(loss_fn, sample_size=2)(params, x)
  bad = jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), stats)
  assert _finite(grads) and not _finite(bad)
  tx = fo.apply_if_finite(fo.frog(0.1), max_consecutive_errors=2)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params, frog_stats=bad)
  assert _finite(updates)
  assert float(sum(jnp.abs(u).sum() for u in jax.tree.leaves(updates))) == 0
  assert int(state.total_notfinite) == 1
  updates, state = tx.update(grads, state, params, frog_stats=stats)
  assert int(state.total_notfinite) == 1
  assert float(jnp.abs(updates['Dense_0']['kernel']).max()) > 0


def test_invalid_damping_values_are_refused_or_caught():
  with pytest.raises(ValueError, match='damping.*at step 0'):
    fo.frog(0.1, damping=lambda count: -1e-3 * (count + 1))
  with pytest.raises(ValueError, match='damping'):
    fo.frog(0.1, damping=float('nan'))
  model, x, params, loss_fn = _dense_problem()
  _, grads, stats = fo.linen.value_and_grad(loss_fn, sample_size=2)(params, x)
  # A schedule that turns negative at step 2 gives a NaN step there, never
  # a finite update of an indefinite system; the guard skips it.
  schedule = lambda count: 1e-3 - 1e-3 * count
  for tx in (fo.frog(0.1, damping=schedule),):
    state = tx.init(params)
    finite = []
    for _ in range(3):
      updates, state = tx.update(grads, state, params, frog_stats=stats)
      finite.append(_finite(updates['Dense_0']))
    assert finite == [True, True, False]
  guarded = fo.apply_if_finite(
    fo.frog(0.1, damping=schedule), max_consecutive_errors=1
  )
  state = guarded.init(params)
  for _ in range(3):
    updates, state = guarded.update(grads, state, params, frog_stats=stats)
  assert _finite(updates) and int(state.total_notfinite) == 1
  # The same for a traced value (inject_hyperparams).
  tx = optax.inject_hyperparams(fo.frog, static_args=('cg_iters',))(
    learning_rate=0.1, damping=1e-3
  )
  state = tx.init(params)
  state.hyperparams['damping'] = jnp.asarray(-1.0)
  step = jax.jit(lambda g, s, st: tx.update(g, s, params, frog_stats=st))
  updates, _ = step(grads, state, stats)
  assert not _finite(updates['Dense_0'])


# ----------------------------------------------------------------------------
# Defaults that train.


class _WideHead(nn.Module):
  """A conv net with a wide Dense after flatten: D = 2305 > s = 16."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
    return nn.Dense(10, name='head')(x.reshape(x.shape[0], -1))


def _wide_head_losses(**frog_kwargs):
  from sklearn.datasets import load_digits  # noqa: PLC0415

  digits = load_digits()  # real digits, upsampled to 24×24
  x_all = np.kron(digits.images, np.ones((1, 3, 3)))[..., None]
  x_all = ((x_all - x_all.mean()) / x_all.std()).astype(np.float32)
  model = _WideHead()
  params = model.init(jax.random.key(0), x_all[:1])['params']
  apply_fn = fo.linen.capture(model.apply)
  loss_fn = lambda p, x, y: _cross_entropy(apply_fn({'params': p}, x), y)
  tx = fo.frog(0.1, **frog_kwargs)

  @jax.jit
  def step(params, state, x, y):
    loss, grads, stats = fo.linen.value_and_grad(loss_fn, sample_size=16)(
      params, x, y
    )
    updates, state = tx.update(grads, state, params, frog_stats=stats)
    return optax.apply_updates(params, updates), state, loss

  state, losses = tx.init(params), []
  rng = np.random.default_rng(0)
  for _ in range(16):
    idx = rng.integers(0, len(digits.target), 128)
    params, state, loss = step(params, state, x_all[idx], digits.target[idx])
    losses.append(float(loss))
  return losses


def test_default_frog_trains_a_wide_dense_after_flatten():
  losses = _wide_head_losses()
  assert max(losses) <= losses[0] + 0.05, losses
  assert losses[-1] < 0.5 * losses[0], losses
  # What the default protects against: damping alone lets it blow up.
  unprotected = _wide_head_losses(rank_damping=0.0)
  assert max(unprotected) > 2 * unprotected[0], unprotected
