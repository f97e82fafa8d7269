"""One training-step interface over optax transformations and kfac-jax.

kfac-jax is an optimizer with its own API (it differentiates the loss
itself, needs the loss registered, and compiles its own step), so the
harness adapts at the level of the whole training step: a `Trainer` is an
`init` and a `step(state, x, y) -> (state, loss)`, and every optimizer in
the registry builds one. States are donated to the step (kfac-jax donates
its own), so callers always continue from the returned state.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

import frog_optax as fo

State = Any


@dataclasses.dataclass(frozen=True)
class Trainer:
  """An optimizer bound to a model.

  Attributes:
    init: `(variables, key, x, y) -> state`; `variables` holds `params` and
      optionally `batch_stats`, `(x, y)` is an example batch.
    step: `(state, x, y) -> (state, loss)`; donates `state`.
    variables: `state -> {'params', 'batch_stats'}` for evaluation.
  """

  init: Callable[[dict, jax.Array, jax.Array, jax.Array], State]
  step: Callable[[State, jax.Array, jax.Array], tuple[State, jax.Array]]
  variables: Callable[[State], dict]


def classification_loss(apply_fn, register_loss: bool = False):
  """`(params, batch_stats, x, y) -> (mean cross-entropy, batch_stats)`."""

  def loss_fn(params, batch_stats, x, y):
    logits, state = apply_fn(
      {'params': params, 'batch_stats': batch_stats}, x, mutable=['batch_stats']
    )
    if register_loss:
      import kfac_jax  # noqa: PLC0415

      kfac_jax.register_softmax_cross_entropy_loss(logits, y)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, state.get('batch_stats', batch_stats)

  return loss_fn


def optax_step(
  model, tx: optax.GradientTransformation, sample_size: int | None = None
):
  """The un-jitted `(params, batch_stats, opt_state), x, y -> new, loss`.

  `sample_size` set = FROG: the loss runs under `fo.linen.capture` and the
  captured statistics go to `tx.update` as `frog_stats`.
  """
  capture = sample_size is not None
  apply_fn = fo.linen.capture(model.apply) if capture else model.apply
  loss_fn = classification_loss(apply_fn)

  def step(state, x, y):
    params, batch_stats, opt_state = state
    if capture:
      (loss, batch_stats), grads, stats = fo.linen.value_and_grad(
        loss_fn, sample_size=sample_size, has_aux=True
      )(params, batch_stats, x, y)
      extra = {'frog_stats': stats}
    else:
      (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x, y
      )
      extra = {}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    params = optax.apply_updates(params, updates)
    return (params, batch_stats, opt_state), loss

  return step


def optax_trainer(
  model, tx: optax.GradientTransformation, sample_size: int | None = None
) -> Trainer:
  """`optax_step` jitted with its state donated."""

  def init(variables, key, x, y):
    del key, x, y
    params = variables['params']
    return params, variables.get('batch_stats', {}), tx.init(params)

  return Trainer(
    init=init,
    step=jax.jit(optax_step(model, tx, sample_size), donate_argnums=0),
    variables=lambda s: {'params': s[0], 'batch_stats': s[1]},
  )


def kfac_trainer(
  model,
  learning_rate: optax.Schedule,
  *,
  momentum: float,
  damping: float,
  weight_decay: float,
  inverse_update_period: int,
  curvature_ema: float = 0.95,
  adaptive_damping: bool = False,
) -> Trainer:
  """kfac-jax's own optimizer (fixed momentum, given schedule).

  The curvature is kfac-jax's default estimator (Fisher with labels sampled
  from the model); `weight_decay` is its `l2_reg`. The damping is fixed, or
  with `adaptive_damping` starts at `damping` and follows kfac-jax's
  Levenberg-Marquardt rule (the reduction ratio of its quadratic model,
  every 5 steps by its default).
  """
  import kfac_jax  # noqa: PLC0415

  from harness import kfac_compat  # noqa: PLC0415

  kfac_compat.patch()
  loss_fn = classification_loss(model.apply, register_loss=True)
  opt = kfac_jax.Optimizer(
    value_and_grad_func=jax.value_and_grad(
      lambda p, bs, batch: loss_fn(p, bs, *batch), has_aux=True
    ),
    l2_reg=weight_decay,
    value_func_has_aux=False,
    value_func_has_state=True,
    value_func_has_rng=False,
    learning_rate_schedule=learning_rate,
    momentum_schedule=lambda _: momentum,
    damping_schedule=None if adaptive_damping else lambda _: damping,
    initial_damping=damping if adaptive_damping else None,
    use_adaptive_learning_rate=False,
    use_adaptive_momentum=False,
    use_adaptive_damping=adaptive_damping,
    num_burnin_steps=0,
    curvature_ema=curvature_ema,
    inverse_update_period=inverse_update_period,
    multi_device=False,
  )

  # kfac-jax decides in Python whether this step refreshes the inverses, so
  # the step count travels as a Python int beside the arrays.
  def init(variables, key, x, y):
    params = variables['params']
    batch_stats = variables.get('batch_stats', {})
    key, init_key = jax.random.split(key)
    opt_state = opt.init(params, init_key, (x, y), func_state=batch_stats)
    if adaptive_damping:
      # kfac-jax makes its damping a float64 under jax_enable_x64, which then
      # promotes the float32 curvature factors, and its lax.cond refuses the
      # mixed dtypes: the damping takes the parameters' dtype.
      dtype = jax.tree.leaves(params)[0].dtype
      opt_state.damping = opt_state.damping.astype(dtype)
    return params, batch_stats, opt_state, key, 0

  def step(state, x, y):
    params, batch_stats, opt_state, key, count = state
    key, step_key = jax.random.split(key)
    params, opt_state, batch_stats, stats = opt.step(
      params,
      opt_state,
      step_key,
      batch=(x, y),
      func_state=batch_stats,
      global_step_int=count,
    )
    return (params, batch_stats, opt_state, key, count + 1), stats['loss']

  return Trainer(
    init=init,
    step=step,
    variables=lambda s: {'params': s[0], 'batch_stats': s[1]},
  )
