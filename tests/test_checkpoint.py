"""Orbax round trip of a TrainState mid-training (issue 5, item 3).

A run saved after two steps, restored into a fresh process-like state and
continued must be bit-identical to the uninterrupted run, for FROG and for a
member whose state holds matrices (FOOF's moving average and factor).
"""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import frog_optax as fo

import models


def _batches(n):
  rng = np.random.default_rng(3)
  return [
    (
      jnp.asarray(rng.normal(size=(models.BATCH, 6, 6, 2)), jnp.float32),
      jnp.asarray(rng.integers(0, 3, models.BATCH)),
    )
    for _ in range(n)
  ]


def _fresh_state(tx):
  model, variables, _, _ = models.setup(jnp.float32)
  state = fo.linen.TrainState.create(
    apply_fn=model.apply, params=variables['params'], tx=tx
  )
  return model, state, variables['batch_stats']


def _step_fn(model):
  loss_fn = models.make_loss(model)

  @jax.jit
  def step(state, batch_stats, x, y):
    (_, new), grads, stats = fo.linen.value_and_grad(
      loss_fn, sample_size=4, has_aux=True
    )(state.params, batch_stats, x, y)
    state = state.apply_gradients(grads=grads, frog_stats=stats)
    return state, new['batch_stats']

  return step


@pytest.mark.parametrize(
  'make_tx',
  [
    lambda: fo.frog(0.1, weight_decay=1e-4, exclude='head'),
    lambda: fo.foof(0.1, update_interval=3, exclude='head'),
  ],
  ids=['frog', 'foof'],
)
def test_resumed_run_is_bit_identical(make_tx, tmp_path):
  batches = _batches(4)
  model, state, batch_stats = _fresh_state(make_tx())
  step = _step_fn(model)
  for x, y in batches:
    state, batch_stats = step(state, batch_stats, x, y)
  straight = (state.params, state.opt_state, batch_stats)

  model, state, batch_stats = _fresh_state(make_tx())
  for x, y in batches[:2]:
    state, batch_stats = step(state, batch_stats, x, y)
  saved = {
    'params': state.params,
    'opt_state': state.opt_state,
    'step': state.step,
    'batch_stats': batch_stats,
  }
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'ckpt', saved)
    checkpointer.wait_until_finished()
    # Restore into the structure of a freshly initialised state.
    _, fresh, fresh_stats = _fresh_state(make_tx())
    target = {
      'params': fresh.params,
      'opt_state': fresh.opt_state,
      'step': fresh.step,
      'batch_stats': fresh_stats,
    }
    restored = checkpointer.restore(tmp_path / 'ckpt', target)
  state = fresh.replace(
    params=restored['params'],
    opt_state=restored['opt_state'],
    step=restored['step'],
  )
  batch_stats = restored['batch_stats']
  assert int(state.step) == 2
  for x, y in batches[2:]:
    state, batch_stats = step(state, batch_stats, x, y)
  resumed = (state.params, state.opt_state, batch_stats)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The state did change after the restore (the check is not vacuous).
  assert not np.array_equal(
    np.asarray(restored['params']['Conv_0']['kernel']),
    np.asarray(state.params['Conv_0']['kernel']),
  )
