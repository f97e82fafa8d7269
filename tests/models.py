"""A tiny conv net and its captured loss, shared by the tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import frog_optax as fo

BATCH = 8


class TinyNet(nn.Module):
  """Conv (bias) → BatchNorm → relu → Conv (no bias) → mean → Dense head."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Conv(4, (3, 3), strides=2, dtype=self.dtype, param_dtype=self.dtype)(
      x
    )
    x = nn.BatchNorm(
      use_running_average=not train, dtype=self.dtype, param_dtype=self.dtype
    )(x)
    x = nn.relu(x)
    x = nn.Conv(
      4, (3, 3), use_bias=False, dtype=self.dtype, param_dtype=self.dtype
    )(x)
    x = x.mean(axis=(1, 2))
    return nn.Dense(3, name='head', dtype=self.dtype, param_dtype=self.dtype)(x)


def setup(dtype=jnp.float32, seed=0):
  """Returns (model, variables, x, y) for a batch of 8 images 6×6×2."""
  model = TinyNet(dtype=dtype)
  kx, kp = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (BATCH, 6, 6, 2), dtype)
  y = jnp.arange(BATCH) % 3
  variables = model.init(kp, x)
  return model, variables, x, y


def make_loss(model, scale=1.0):
  apply_fn = fo.linen.capture(model.apply)

  def loss_fn(params, batch_stats, x, y):
    logits, state = apply_fn(
      {'params': params, 'batch_stats': batch_stats}, x, mutable=['batch_stats']
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), y
    ).mean()
    return scale * loss, state

  return loss_fn


def grads_and_stats(dtype=jnp.float32, sample_size=4, scale=1.0, seed=0):
  model, variables, x, y = setup(dtype, seed)
  loss_fn = make_loss(model, scale)
  _, grads, stats = fo.linen.value_and_grad(
    loss_fn, sample_size=sample_size, has_aux=True
  )(variables['params'], variables['batch_stats'], x, y)
  return variables['params'], grads, stats
