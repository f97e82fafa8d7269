"""Hyper-parameter checks that raise clear errors at construction time.

Values that are traced (for example inside `optax.inject_hyperparams`) or
schedules cannot be checked here and pass through unchecked; the last two
functions give such a value at a step, and make an invalid one visible.
"""

import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from frog_optax._src import paths


def is_concrete_number(value: Any) -> bool:
  if isinstance(value, bool):
    return False
  if isinstance(value, (int, float, np.number)):
    return True
  if isinstance(value, (np.ndarray, jax.Array)):
    return not isinstance(value, jax.core.Tracer) and np.ndim(value) == 0
  return False


def check_range(
  name: str,
  value: Any,
  *,
  low: float | None = None,
  high: float | None = None,
  low_inclusive: bool = True,
  high_inclusive: bool = True,
  allow_schedule: bool = False,
) -> None:
  """Raises `ValueError` naming `name` when a concrete value is out of range.

  Infinite and NaN values are always out of range. A schedule (when
  allowed) is probed at its first steps and must be in range there.
  """
  bounds = dict(
    low=low,
    high=high,
    low_inclusive=low_inclusive,
    high_inclusive=high_inclusive,
  )
  if callable(value):
    if not allow_schedule:
      raise ValueError(
        f'{name} must be a number, not a schedule; got {value!r}.'
      )
    for count, probed in _probe_schedule(value):
      try:
        check_range(name, probed, **bounds)
      except ValueError as error:
        e = str(error)
        raise ValueError(f'{e[:-1]} at step {count} of its schedule.') from None
    return
  if not is_concrete_number(value):
    if isinstance(value, (jax.Array, np.ndarray)) and not isinstance(
      value, jax.core.Tracer
    ):
      raise ValueError(f'{name} must be a scalar; got shape {np.shape(value)}.')
    if isinstance(value, jax.core.Tracer):
      return
    raise ValueError(f'{name} must be a number; got {value!r}.')
  v = float(value)
  lo_ok = (low is None or (v >= low if low_inclusive else v > low)) and bool(
    np.isfinite(v)
  )
  hi_ok = high is None or (v <= high if high_inclusive else v < high)
  if not (lo_ok and hi_ok):
    lo = '(-inf' if low is None else ('[' if low_inclusive else '(') + f'{low}'
    hi = (
      'inf)' if high is None else f'{high}' + (']' if high_inclusive else ')')
    )
    shown = int(value) if isinstance(value, (int, np.integer)) else v
    raise ValueError(f'{name} must be in {lo}, {hi}; got {shown!r}.')


# The first steps only: a decay that turns negative later may be meant for a
# shorter run (the update guards those steps at run time).
_PROBE_COUNTS = (0, 1)


def _probe_schedule(schedule):
  """`(count, value)` of a schedule at a few counts; nothing if it fails.

  A schedule that cannot run eagerly on an int32 count is left to fail (or
  not) where optax calls it.
  """
  values = []
  for count in _PROBE_COUNTS:
    try:
      value = schedule(np.int32(count))
    except Exception:  # noqa: BLE001 - probing only
      return []
    if isinstance(value, jax.core.Tracer) or np.ndim(value) != 0:
      return []
    values.append((count, value))
  return values


def check_positive_int(name: str, value: Any) -> None:
  """Accepts Python ints >= 1 (and traced ints from inject_hyperparams)."""
  if isinstance(value, jax.core.Tracer):
    return
  if isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) == 0:
    if not np.issubdtype(np.asarray(value).dtype, np.integer):
      raise ValueError(f'{name} must be an integer; got {value!r}.')
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f'{name} must be an integer >= 1; got {value!r}.')
  if value < 1:
    raise ValueError(f'{name} must be an integer >= 1; got {value!r}.')


def normalize_paths(name: str, paths: str | Sequence[str]) -> tuple[str, ...]:
  """Accepts one '/'-joined module path or a sequence of them."""
  if isinstance(paths, str):
    paths = (paths,)
  try:
    paths = tuple(paths)
  except TypeError:
    raise ValueError(
      f'{name} must be a sequence of module paths; got {paths!r}.'
    ) from None
  for p in paths:
    if not isinstance(p, str) or not p.strip('/'):
      raise ValueError(
        f"{name} entries must be non-empty '/'-joined module paths such as"
        f" 'head' or 'block3/Dense_0'; got {p!r}."
      )
  return tuple(p.strip('/') for p in paths)


def check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f'{name} must be one of {choices}; got {value!r}.')


def check_bool(name, value):
  if not isinstance(value, bool):
    raise ValueError(f'{name} must be a bool; got {value!r}.')


def check_cg_iters(cg_iters):
  """A positive int; warns when it is a concrete array (slow fori_loop)."""
  check_positive_int('cg_iters', cg_iters)
  if not isinstance(cg_iters, (int, np.integer)) and not isinstance(
    cg_iters, jax.core.Tracer
  ):
    # Only concrete arrays warn (e.g. inject_hyperparams' init), not every
    # traced update.
    warnings.warn(
      'cg_iters is an array, so the CG runs as a fori_loop, which XLA:CPU'
      ' executes several times slower than the unrolled loop of a Python int.'
      " With optax.inject_hyperparams pass static_args=('cg_iters',).",
      stacklevel=3,
    )


def check_float_params(tree: Any, leaves: Any = None) -> None:
  """Refuses integer (or other non-float) parameters, naming them.

  Args:
    tree: parameters (or updates).
    leaves: only check these '/'-joined leaf paths (default: all).
  """
  bad = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = paths.path_name(paths.param_path(path))
    dtype = getattr(leaf, 'dtype', None)
    if leaves is not None and name not in leaves:
      continue
    if dtype is not None and not jnp.issubdtype(dtype, jnp.inexact):
      bad.append(f'{name}: {dtype}')
  if bad:
    raise ValueError(
      'frog_optax optimizers update floating-point parameters only; got'
      f' {bad[:10]}. Keep integer state out of the optimised tree (for'
      ' example in a separate Flax collection).'
    )


def schedule_value(value: Any, count: jax.Array):
  """A hyper-parameter at step `count`: calls schedules, passes numbers."""
  return value(count) if callable(value) else value


def nonnegative_or_nan(value: Any) -> jax.Array:
  """`value`, or NaN where it is negative.

  For values that cannot be checked at construction (schedules, traced
  hyper-parameters): an invalid damping must make the step visibly
  non-finite (and skippable with :func:`frog_optax.apply_if_finite`), not
  give a finite update of an indefinite system.
  """
  value = jnp.asarray(value)
  return jnp.where(value >= 0, value, jnp.nan)
