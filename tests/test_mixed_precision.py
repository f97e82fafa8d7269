"""bfloat16 activations with float32 parameters, momentum and solve.

Issue 5, item 2: the main job's conv net (the data-parallel example's run,
on one device) trained for N steps on digits with bfloat16 activations and
compute stays finite and within a stated tolerance of the run in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import frog_optax as fo
from examples.data_parallel import train
from harness import data as data_lib
from harness import models
from harness import trainers

STEPS = 40
BATCH = 64
# Stated tolerance after STEPS steps: the evaluation loss (computed in
# float32 on held-out digits) within 25% of float32's, accuracy within 3
# points.
LOSS_RTOL = 0.25
ACCURACY_ATOL = 0.03


def _train(dtype):
  """The data-parallel example's run on one device, evaluated in float32."""
  config = train.Config(
    steps=STEPS, batch_size=BATCH, sample_size=16, dtype=dtype
  )
  losses, _, (params, batch_stats, opt_state) = train.train(
    config, devices=jax.devices()[:1]
  )
  data = data_lib.load('digits')
  logits = train.make_model(train.Config()).apply(
    {'params': params, 'batch_stats': batch_stats},
    jnp.asarray(data.x_test, jnp.float32),
    train=False,
  )
  y_test = jnp.asarray(data.y_test)
  eval_loss = float(
    optax.softmax_cross_entropy_with_integer_labels(logits, y_test).mean()
  )
  accuracy = float((logits.argmax(-1) == y_test).mean())
  return losses, eval_loss, accuracy, params, opt_state


def test_bfloat16_training_tracks_float32():
  losses16, loss16, acc16, params16, opt16 = _train('bfloat16')
  losses32, loss32, acc32, _, _ = _train('float32')
  assert np.all(np.isfinite(losses16))
  assert losses16[-1] < 0.5 * losses16[0]  # it trains
  assert abs(loss16 - loss32) <= LOSS_RTOL * loss32, (loss16, loss32)
  assert abs(acc16 - acc32) <= ACCURACY_ATOL, (acc16, acc32)
  # Parameters and every momentum buffer stay float32.
  for leaf in jax.tree.leaves((params16, opt16)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32, leaf.dtype


def test_bfloat16_layers_are_captured_in_bfloat16():
  model = models.ConvNet(num_classes=10, features=(8,), dtype=jnp.bfloat16)
  x = jnp.ones((8, 8, 8, 1), jnp.bfloat16)
  variables = model.init(jax.random.key(0), x)
  loss_fn = trainers.classification_loss(fo.linen.capture(model.apply))
  _, grads, stats = fo.linen.value_and_grad(
    loss_fn, sample_size=4, has_aux=True
  )(variables['params'], variables['batch_stats'], x, jnp.zeros(8, jnp.int32))
  is_stats = lambda s: isinstance(s, fo.LayerStats)
  captured = [
    s for s in jax.tree.leaves(stats, is_leaf=is_stats) if is_stats(s)
  ]
  assert captured
  assert all(s.inputs.dtype == jnp.bfloat16 for s in captured)
  # The solve runs in float32 (the direction's dtype) and returns float32.
  tx = fo.scale_by_frog()
  u, _ = tx.update(grads, tx.init(grads), frog_stats=stats)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(u))
