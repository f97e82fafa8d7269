"""Skipping steps whose gradients, stats or updates are not finite.

`optax.apply_if_finite` looks at the gradients only. A preconditioner can
also be poisoned by its statistics (a NaN in the captured inputs or output
gradients) or by a hyper-parameter (a damping schedule that returns NaN),
while the gradients stay finite. This guard looks at all three.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def _all_finite(tree: Any) -> jax.Array:
  leaves = [
    jnp.all(jnp.isfinite(leaf))
    for leaf in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def apply_if_finite(
  inner: optax.GradientTransformation, max_consecutive_errors: int
) -> optax.GradientTransformationExtraArgs:
  """Skips a step whose gradients, `frog_stats` or updates are not finite.

  Like `optax.apply_if_finite` (same state, :class:`optax.ApplyIfFiniteState`,
  and the same `max_consecutive_errors` rule), but a step is also rejected
  when the `frog_stats` keyword argument or the updates `inner` computes
  hold a NaN or an infinity. A rejected step returns zero updates and keeps
  the inner state unchanged; `state.total_notfinite` counts them.

  Args:
    inner: the optimizer to guard, e.g. :func:`frog_optax.frog`.
    max_consecutive_errors: rejected steps in a row after which a
      non-finite step is applied anyway (as in optax).

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, frog_optax as fo
    >>> params = {'Dense_0': {'kernel': jnp.ones((3, 2))}}
    >>> stats = {'Dense_0': fo.LayerStats(
    ...     inputs=jnp.full((4, 3), jnp.nan), output_grads=jnp.ones((4, 2)),
    ...     geometry=fo.DenseGeometry())}
    >>> tx = fo.apply_if_finite(fo.frog(0.1), max_consecutive_errors=3)
    >>> state = tx.init(params)
    >>> u, state = tx.update(params, state, params, frog_stats=stats)
    >>> float(abs(u['Dense_0']['kernel']).max()), int(state.total_notfinite)
    (0.0, 1)
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return optax.ApplyIfFiniteState(
      notfinite_count=jnp.zeros([], jnp.int32),
      last_finite=jnp.array(True),
      total_notfinite=jnp.zeros([], jnp.int32),
      inner_state=inner.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, new_inner = inner.update(
      updates, state.inner_state, params, **extra_args
    )
    finite = (
      _all_finite(updates)
      & _all_finite(extra_args.get('frog_stats'))
      & _all_finite(new_updates)
    )
    notfinite_count = jnp.where(
      finite, 0, optax.safe_increment(state.notfinite_count)
    )
    accept = finite | (notfinite_count > max_consecutive_errors)
    pick = lambda new, old: jax.tree.map(
      lambda a, b: jnp.where(accept, a, b), new, old
    )
    return pick(new_updates, optax.tree.zeros_like(new_updates)), (
      optax.ApplyIfFiniteState(
        notfinite_count=notfinite_count,
        last_finite=finite,
        total_notfinite=jnp.where(
          finite,
          state.total_notfinite,
          optax.safe_increment(state.total_notfinite),
        ),
        inner_state=pick(new_inner, state.inner_state),
      )
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
