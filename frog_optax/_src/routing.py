"""Which parameters a row preconditioner owns, and the fallback for the rest.

The choice is made from the parameter tree alone (so `init` knows it): every
module dict that holds exactly a `kernel` of rank >= 2 and optionally a
`bias` of lower rank (Flax `Dense`, `Conv`, `DenseGeneral`, `Einsum`, and
their `nn.scan` stacks), unless its path is excluded. Every member
of the family (FROG, K-FROG, FOOF, AdaFisher) routes the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax

from frog_optax._src import paths
from frog_optax._src import validation

PRECONDITIONED = 'frog'
FALLBACK = 'fallback'


def module_leaves(tree: Any) -> dict[str, dict[str, Any]]:
  """Groups the leaves of a tree by parent path: `{module: {name: leaf}}`."""
  modules: dict[str, dict[str, Any]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parent, name = paths.module_and_leaf(path)
    modules.setdefault(parent, {})[name] = leaf
  return modules


def _is_row_layer(leaves: dict[str, Any]) -> bool:
  """A Dense/Conv-like module: a kernel of rank >= 2 and maybe a bias.

  The bias has fewer axes than the kernel: `(rows,)` for Dense and Conv, the
  output axes for DenseGeneral and Einsum, with a leading layer axis under
  `nn.scan`. Which axes are rows is told by the captured stats.
  """
  if set(leaves) not in ({'kernel'}, {'kernel', 'bias'}):
    return False
  kernel_ndim = getattr(leaves['kernel'], 'ndim', 0)
  if kernel_ndim < 2:
    return False
  bias = leaves.get('bias')
  return bias is None or 1 <= getattr(bias, 'ndim', 0) < kernel_ndim


def is_excluded(module: str, exclude: Sequence[str]) -> bool:
  return any(module == e or module.startswith(e + '/') for e in exclude)


def row_layers(modules: dict[str, dict[str, Any]]) -> list[str]:
  """The sorted paths of the Dense/Conv-like modules among `modules`."""
  return sorted(m for m, leaves in modules.items() if _is_row_layer(leaves))


def preconditioned_modules(
  params: Any, exclude: Sequence[str] = ()
) -> list[str]:
  """The '/'-joined paths of the modules FROG preconditions in `params`.

  Args:
    params: a parameter tree.
    exclude: module paths (or path prefixes) routed to the fallback instead.

  Returns:
    Sorted module paths.

  Raises:
    ValueError: when an `exclude` entry matches no preconditionable module.

  Example:
    >>> import jax.numpy as jnp, frog_optax as fo
    >>> params = {'conv': {'kernel': jnp.ones((3, 3, 1, 2))},
    ...           'norm': {'scale': jnp.ones(2)},
    ...           'head': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}}
    >>> fo.preconditioned_modules(params, exclude='head')
    ['conv']
  """
  exclude = validation.normalize_paths('exclude', exclude)
  candidates = row_layers(module_leaves(params))
  unmatched = [
    e for e in exclude if not any(is_excluded(m, (e,)) for m in candidates)
  ]
  if unmatched:
    raise ValueError(
      f'exclude entries {unmatched} match no Dense/Conv module; modules'
      f' that can be excluded: {candidates[:20]}'
      + (' ...' if len(candidates) > 20 else '')
    )
  return [m for m in candidates if not is_excluded(m, exclude)]


def frog_param_labels(params: Any, exclude: Sequence[str] = ()) -> Any:
  """Labels every leaf `'frog'` (preconditioned) or `'fallback'`.

  Suitable for `optax.partition`; the same labels serve every member of the
  family.
  """
  chosen = set(preconditioned_modules(params, exclude))
  return jax.tree_util.tree_map_with_path(
    lambda path, _: (
      PRECONDITIONED if paths.module_and_leaf(path)[0] in chosen else FALLBACK
    ),
    params,
  )


def _cast_to_param_dtypes() -> optax.GradientTransformation:
  """Returns updates in the parameter dtypes (momentum may be wider).

  Integer parameters are refused at `init`: the cast would truncate every
  update to zero.
  """

  def init_fn(params):
    validation.check_float_params(params)
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      return updates, state
    return jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params), state

  return optax.GradientTransformation(init_fn, update_fn)


class RoutedTransformation(optax.GradientTransformationExtraArgs):
  """An optimizer of the family, which remembers its `exclude`.

  It is the `(init, update)` pair optax expects; the extra attribute lets
  :func:`frog_optax.describe` show the routing of the optimizer itself.
  """

  exclude: tuple[str, ...]


def exclude_of(routing_or_exclude: Any) -> tuple[str, ...]:
  """Module paths excluded by an optimizer, or the paths themselves.

  Accepts an `exclude` value (a path or a sequence of paths), an optimizer
  made by this library (e.g. `fo.frog(...)`), or an `nnx.Optimizer`
  holding one.
  """
  value = routing_or_exclude
  if hasattr(value, 'tx') and not isinstance(value, (str, tuple, list)):
    value = value.tx  # nnx.Optimizer
  if isinstance(value, RoutedTransformation):
    return value.exclude
  if isinstance(value, optax.GradientTransformation):
    raise ValueError(
      'Cannot read the routing of this transformation (it was not made by'
      ' frog_optax, or was wrapped, e.g. by optax.inject_hyperparams or'
      ' optax.chain); pass the exclude=... it was built with instead.'
    )
  return validation.normalize_paths('exclude', value)


def route(
  preconditioned: optax.GradientTransformation,
  fallback: optax.GradientTransformation,
  exclude: Sequence[str],
) -> optax.GradientTransformationExtraArgs:
  """Sends preconditioned modules to one chain and the rest to `fallback`.

  The result returns updates in the parameter dtypes. `exclude` is applied
  here, so `preconditioned` never sees excluded layers.
  """
  if not isinstance(fallback, optax.GradientTransformation):
    raise ValueError(
      f'fallback must be an optax.GradientTransformation; got {fallback!r}.'
    )
  chained = optax.chain(
    optax.partition(
      {PRECONDITIONED: preconditioned, FALLBACK: fallback},
      lambda params: frog_param_labels(params, exclude),
    ),
    _cast_to_param_dtypes(),
  )
  routed = RoutedTransformation(chained.init, chained.update)
  routed.exclude = tuple(exclude)
  return routed
