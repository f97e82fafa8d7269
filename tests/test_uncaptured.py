"""A layer the capture does not capture never stops the model.

It runs unchanged, its stats entry is an `UncapturedLayer` with the reason,
and the optimizers send it to the fallback when their `exclude` names it
(and raise, naming it, when it does not). Also: Einsums whose batch axis is
not the first output axis (Gemma's attention), checked in float64 against
the same layer written batch-first, and `value_and_grad(exclude=...)`.
"""

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

CUSTOM_EINSUM = 'a custom einsum_op is set'


# ----------------------------------------------------------------------------
# Einsums with the batch axis elsewhere than first in the outputs.


class Projection(nn.Module):
  """`x -> einsum(equation, x, kernel)`, the outputs brought to `BTSNH`."""

  equation: str

  @nn.compact
  def __call__(self, x):
    y = nn.Einsum((3, 2, 4, 5), self.equation, name='qkv')(x)
    if self.equation.endswith('SBTNH'):
      y = jnp.moveaxis(y, 0, 2)  # SBTNH -> BTSNH
    return y


def _projection_update(equation, rng):
  model = Projection(equation)
  x = jax.random.normal(jax.random.key(0), (6, 7, 4), jnp.float64)
  target = jax.random.normal(jax.random.key(1), (6, 7, 3, 2, 5), jnp.float64)
  params = Projection('BTD,SNDH->BTSNH').init(jax.random.key(2), x)['params']
  params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
  apply_fn = fo.linen.capture(model.apply)
  loss_fn = lambda p: jnp.mean(
    (jnp.tanh(apply_fn({'params': p}, x)) - target) ** 2
  )
  loss, grads, stats = fo.linen.value_and_grad(loss_fn, sample_size=3, rng=rng)(
    params
  )
  tx = fo.frog(0.1, damping=1e-3)
  updates, _ = tx.update(grads, tx.init(params), params, frog_stats=stats)
  return loss, grads, stats['qkv'], updates


@pytest.mark.parametrize('random_rows', [False, True])
def test_einsum_with_batch_axis_second_equals_batch_first(random_rows):
  rng = jax.random.key(3) if random_rows else None
  got = _projection_update('BTD,SNDH->SBTNH', rng)
  want = _projection_update('BTD,SNDH->BTSNH', rng)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
  chex.assert_trees_all_close(got[1], want[1], rtol=1e-12, atol=1e-15)
  chex.assert_trees_all_close(got[2].inputs, want[2].inputs, rtol=1e-12)
  chex.assert_trees_all_close(
    got[2].output_grads, want[2].output_grads, rtol=1e-12, atol=1e-15
  )
  assert got[2].layout == want[2].layout
  assert got[2].output_grads.shape == (3 * 7, 3 * 2 * 5)  # 3 examples
  chex.assert_trees_all_close(got[3], want[3], rtol=1e-10, atol=1e-14)
  assert np.all(np.abs(got[3]['qkv']['kernel']) > 0)


# ----------------------------------------------------------------------------
# A Gemma-style attention block (NNX) under nnx.jit.


class Block(nnx.Module):
  """Attention as Gemma writes it (q, k, v stacked first), then an MLP."""

  def __init__(self, rngs, einsum_op=jnp.einsum):
    d, heads, h = 8, 2, 4
    self.heads = heads
    self.qkv_einsum = nnx.Einsum(
      'BTD,SNDH->SBTNH', (3, heads, d, h), einsum_op=einsum_op, rngs=rngs
    )
    self.attn_vec_einsum = nnx.Einsum('BTNH,NHD->BTD', (heads, h, d), rngs=rngs)
    self.up = nnx.Linear(d, 16, rngs=rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    q, k, v = self.qkv_einsum(x)
    logits = jnp.einsum('BTNH,BSNH->BNTS', q, k) / 2.0
    attn = jnp.einsum('BNTS,BSNH->BTNH', jax.nn.softmax(logits), v)
    x = x + self.attn_vec_einsum(attn)
    return self.head(nnx.gelu(self.up(x)).mean(axis=1))


def _block_data():
  x = jax.random.normal(jax.random.key(0), (16, 5, 8))
  labels = jnp.argmax(x.sum(axis=1)[:, :3], axis=-1)
  return x, labels


def _train_block(model, tx, capture_exclude=(), steps=12):
  x, labels = _block_data()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(
      m(x), labels
    ).mean()
    loss, grads, stats = fo.nnx.value_and_grad(
      loss_fn, sample_size=8, exclude=capture_exclude
    )(model)
    optimizer.update(model, grads, frog_stats=stats)
    return loss, stats

  losses = []
  for _ in range(steps):
    loss, stats = step(model, optimizer)
    losses.append(float(loss))
  return losses, stats


@pytest.mark.parametrize(
  'einsum_op, exclude, capture_exclude, qkv_entry',
  [
    # Captured: the batch axis is the second output axis.
    (jnp.einsum, ('head',), (), fo.LayerStats),
    # Refused by the capture (a custom einsum_op), excluded as the error says.
    (
      functools.partial(jnp.einsum, precision='highest'),
      ('head', 'qkv_einsum'),
      (),
      fo.UncapturedLayer,
    ),
    # Excluded from the capture too: no work spent on it.
    (jnp.einsum, ('head', 'qkv_einsum'), 'optimizer', fo.UncapturedLayer),
  ],
)
def test_gemma_style_attention_trains_with_frog(
  einsum_op, exclude, capture_exclude, qkv_entry
):
  model = Block(nnx.Rngs(0), einsum_op)
  tx = fo.frog(0.1, exclude=exclude)
  if capture_exclude == 'optimizer':
    capture_exclude = tx
  losses, stats = _train_block(model, tx, capture_exclude)
  assert isinstance(stats['qkv_einsum'], qkv_entry)
  for name in ('attn_vec_einsum', 'up'):
    assert isinstance(stats[name], fo.LayerStats)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.8 * losses[0]


def test_a_refused_layer_that_is_not_excluded_is_named_with_its_reason():
  op = functools.partial(jnp.einsum, precision='highest')
  model = Block(nnx.Rngs(0), op)
  x, labels = _block_data()
  loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(
    m(x), labels
  ).mean()
  _, grads, stats = fo.nnx.value_and_grad(loss_fn, sample_size=8)(model)
  assert stats['qkv_einsum'] == fo.UncapturedLayer('Einsum', CUSTOM_EINSUM)
  optimizer = nnx.Optimizer(model, fo.frog(0.1, exclude='head'), wrt=nnx.Param)
  with pytest.raises(
    ValueError, match=rf"'qkv_einsum' \(Einsum: {CUSTOM_EINSUM}\)"
  ) as error:
    optimizer.update(model, grads, frog_stats=stats)
  message = str(error.value)
  assert "exclude=('qkv_einsum',)" in message
  assert 'linen.capture' not in message  # only advice that works
  table = fo.nnx.describe(model, stats, optimizer)
  line = next(r for r in table.splitlines() if r.startswith('qkv_einsum'))
  assert 'ERROR' in line and CUSTOM_EINSUM in line


# ----------------------------------------------------------------------------
# value_and_grad(exclude=...), describe, and calls that cannot be combined.


class TwoConvs(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3), name='first')(x))
    return nn.Conv(2, (3, 3), name='second')(x).sum()


def _two_convs():
  model = TwoConvs()
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 2))
  params = model.init(jax.random.key(1), x)['params']
  apply_fn = fo.linen.capture(model.apply)
  return params, lambda p: apply_fn({'params': p}, x)


def test_value_and_grad_exclude_skips_the_capture():
  params, loss_fn = _two_convs()
  loss, grads, stats = fo.linen.value_and_grad(
    loss_fn, sample_size=2, exclude='first'
  )(params)
  want_loss, want_grads = jax.value_and_grad(loss_fn)(params)
  assert loss == want_loss
  chex.assert_trees_all_equal(grads, want_grads)
  assert stats['first'].layer_type == 'Conv'
  assert 'excluded from the capture' in stats['first'].reason
  assert isinstance(stats['second'], fo.LayerStats)
  # No capture work for it: fewer operations than capturing both.
  count = lambda **kw: len(
    jax.make_jaxpr(fo.linen.value_and_grad(loss_fn, sample_size=2, **kw))(
      params
    ).eqns
  )
  assert count(exclude='first') < count()
  tx = fo.frog(0.1)
  with pytest.raises(ValueError, match=r"'first' \(Conv: excluded from"):
    tx.update(grads, tx.init(params), params, frog_stats=stats)
  tx = fo.frog(0.1, exclude='first')
  _, _, stats_tx = fo.linen.value_and_grad(loss_fn, sample_size=2, exclude=tx)(
    params
  )
  chex.assert_trees_all_equal(stats_tx, stats)
  table = fo.describe(params, stats, tx)
  first = next(r for r in table.splitlines() if r.startswith('first'))
  assert 'fallback' in first and 'excluded; not captured (Conv:' in first
  updates, _ = tx.update(grads, tx.init(params), params, frog_stats=stats)
  assert np.all(np.isfinite(updates['second']['kernel']))


def test_value_and_grad_exclude_names_unknown_entries():
  params, loss_fn = _two_convs()
  with pytest.raises(ValueError, match=r"exclude entries \['third'\]"):
    fo.linen.value_and_grad(loss_fn, sample_size=2, exclude='third')(params)
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"exclude entries \['third'\]"):
    fo.nnx.value_and_grad(
      lambda m: m(jnp.ones((4, 3))).sum(), sample_size=2, exclude='third'
    )(model)


def test_calls_that_cannot_be_combined_are_not_captured():
  class Shared(nn.Module):
    @nn.compact
    def __call__(self, x, z):
      conv = nn.Conv(2, (3, 3), name='shared')
      return conv(x).sum() + conv(z).sum()

  model = Shared()
  x, z = jnp.ones((4, 5, 5, 2)), jnp.ones((4, 7, 7, 2))
  params = model.init(jax.random.key(0), x, z)['params']
  apply_fn = fo.linen.capture(model.apply)
  loss_fn = lambda p: apply_fn({'params': p}, x, z)
  _, grads, stats = fo.linen.value_and_grad(loss_fn, sample_size=2)(params)
  chex.assert_trees_all_equal(grads, jax.grad(loss_fn)(params))
  assert stats['shared'].layer_type == 'Conv'
  assert 'inputs of different shapes' in stats['shared'].reason
