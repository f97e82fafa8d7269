"""What every optimizer alias of the family shares.

Hyper-parameter checks, the heavy-ball momentum,
the reference FROG's fallback for parameters a member does not precondition,
and the alias chain momentum → member → weight decay → learning rate, routed
against the fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from frog_optax._src import routing
from frog_optax._src import validation


def scaled(learning_rate: optax.ScalarOrSchedule, ratio: Any):
  """`learning_rate * ratio`, keeping schedules schedules."""
  if callable(learning_rate):
    return lambda count: learning_rate(count) * ratio
  return learning_rate * ratio


def heavy_ball(
  momentum: Any, nesterov: bool, mu_dtype: Any
) -> optax.GradientTransformation:
  """`optax.trace`, except that momentum 0 carries nothing between steps.

  `optax.trace` computes `g + β·m`, which at β = 0 keeps a NaN or infinity
  of one step in every later step (0·inf = nan); with β = 0 the direction
  is the gradient alone.
  """
  trace = optax.trace(
    decay=momentum, nesterov=nesterov, accumulator_dtype=mu_dtype
  )
  if validation.is_concrete_number(momentum) and float(momentum) > 0:
    return trace

  def update_fn(updates, state, params=None):
    forget = lambda m: jnp.where(momentum == 0, jnp.zeros_like(m), m)
    state = state._replace(trace=jax.tree.map(forget, state.trace))
    return trace.update(updates, state, params)

  return optax.GradientTransformation(trace.init, update_fn)


def reference_fallback(
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: Any = 0.9,
  nesterov: bool = False,
  weight_decay: Any = 0.0,
  weight_decay_mask: Any = None,
  mu_dtype: Any = None,
) -> optax.GradientTransformation:
  """The reference FROG's rule for other parameters: momentum SGD.

  Coupled weight decay (`wd·θ` added to the gradient before momentum), as in
  `torch.optim.SGD`.
  """
  return optax.chain(
    optax.add_decayed_weights(weight_decay, weight_decay_mask),
    heavy_ball(momentum, nesterov, mu_dtype),
    optax.scale_by_learning_rate(learning_rate),
  )


def resolve_fallback(
  fallback: optax.GradientTransformation | None,
  other_lr_ratio: float | None,
  default_ratio: float,
  build_default: Callable[[optax.ScalarOrSchedule], Any],
  learning_rate: optax.ScalarOrSchedule,
) -> optax.GradientTransformation:
  """The user's fallback, or `build_default(learning_rate * ratio)`."""
  if fallback is not None:
    if other_lr_ratio is not None:
      raise ValueError(
        'other_lr_ratio only configures the default fallback; set the'
        ' learning rate of your own fallback transformation instead.'
      )
    return fallback
  ratio = default_ratio if other_lr_ratio is None else other_lr_ratio
  validation.check_range('other_lr_ratio', ratio, low=0.0)
  return build_default(scaled(learning_rate, ratio))


def check_common(learning_rate, weight_decay):
  """Checks the hyper-parameters every alias of the family has."""
  validation.check_range(
    'learning_rate', learning_rate, low=0.0, allow_schedule=True
  )
  validation.check_range('weight_decay', weight_decay, low=0.0)


def heavy_ball_optimizer(
  scale_by: optax.GradientTransformationExtraArgs,
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: float,
  nesterov: bool,
  weight_decay: float,
  weight_decay_mask: Any,
  exclude: Sequence[str],
  fallback: optax.GradientTransformation | None,
  other_lr_ratio: float | None,
  default_other_lr_ratio: float,
  mu_dtype: Any,
  layouts: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """momentum → `scale_by` → decoupled weight decay → learning rate.

  The alias shape of FROG, K-FROG and FOOF. Parameters `scale_by` does not
  own go to `fallback`, by default the reference's momentum SGD at
  `learning_rate * other_lr_ratio` with coupled weight decay. `layouts`
  (those given to `scale_by`) also name the layers of models that are not
  Flax modules.
  """
  check_common(learning_rate, weight_decay)
  validation.check_range(
    'momentum', momentum, low=0.0, high=1.0, high_inclusive=False
  )
  validation.check_bool('nesterov', nesterov)
  exclude = validation.normalize_paths('exclude', exclude)
  fallback = resolve_fallback(
    fallback,
    other_lr_ratio,
    default_other_lr_ratio,
    lambda lr: reference_fallback(
      lr,
      momentum=momentum,
      nesterov=nesterov,
      weight_decay=weight_decay,
      weight_decay_mask=weight_decay_mask,
      mu_dtype=mu_dtype,
    ),
    learning_rate,
  )
  preconditioned = optax.chain(
    heavy_ball(momentum, nesterov, mu_dtype),
    scale_by,
    optax.add_decayed_weights(weight_decay, weight_decay_mask),
    optax.scale_by_learning_rate(learning_rate),
  )
  return routing.route(preconditioned, fallback, exclude, layouts)
