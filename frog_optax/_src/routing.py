"""Which parameters a row preconditioner owns, and the fallback for the rest.

The choice is made before any stats are seen (so `init` knows it), from the
parameter tree and the optimizer's `layouts`: every module dict that holds
exactly a `kernel` of rank >= 2 and optionally a `bias` of lower rank (Flax
`Dense`, `Conv`, `DenseGeneral`, `Einsum`, and their `nn.scan` stacks),
plus every layer the `layouts` place at a kernel leaf of their own (models
that are not Flax modules, captured by `frog_optax.jax`), unless its path is
excluded or the `layouts` mark it as not captured. Every member of the
family (FROG, K-FROG, FOOF, AdaFisher) routes the same way, and only the
aliases route: :func:`route` builds the layer table once per update, hands
the owned layers down to the preconditioner, and casts the result to the
parameter dtypes. The optimizers' `layouts` argument (which axes of each
layer are rows) is read here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax

from frog_optax._src import paths
from frog_optax._src import stats as stats_lib
from frog_optax._src import validation

PRECONDITIONED = 'frog'
FALLBACK = 'fallback'


def _is_layout_leaf(x: Any) -> bool:
  return x is None or isinstance(
    x,
    (stats_lib.ParamLayout, stats_lib.LayerStats, stats_lib.UncapturedLayer),
  )


def _resolve(layouts: Any, params: Any) -> Any:
  """The layouts tree: `layouts(params)` for a function, else `layouts`.

  A callable pytree (an Equinox module holding layouts) is a tree.
  """
  leaves = jax.tree_util.tree_leaves(layouts, is_leaf=_is_layout_leaf)
  is_function = len(leaves) == 1 and leaves[0] is layouts
  return layouts(params) if callable(layouts) and is_function else layouts


def layouts_by_path(layouts: Any, params: Any) -> dict[str, Any]:
  """`{path: ParamLayout or UncapturedLayer}` from a `layouts` argument.

  Args:
    layouts: `None` (every module row-stacked: plain Dense/Conv), a
      params-prefix tree holding a `ParamLayout` (or a `LayerStats`, whose
      layout is taken) per module, or an `UncapturedLayer` for a module to
      send to the fallback, or a function of the parameters that returns
      one.
    params: the parameter tree (for a function).
  """
  if layouts is None:
    return {}
  tree = _resolve(layouts, params)
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_layout_leaf)
  entries = ((paths.path_name(p), getattr(x, 'layout', x)) for p, x in flat)
  kinds = (stats_lib.ParamLayout, stats_lib.UncapturedLayer)
  return {name: e for name, e in entries if isinstance(e, kinds)}


def layout_tree(stats: Any, keep_uncaptured: bool = False) -> Any:
  """The `layouts` argument for the optimizers, from a (shape) stats tree.

  With `keep_uncaptured`, `UncapturedLayer` entries stay (the optimizers
  then send those layers to the fallback); else they become `None`.
  """

  def layout(s):
    if isinstance(s, stats_lib.LayerStats):
      return s.layout
    if keep_uncaptured and isinstance(s, stats_lib.UncapturedLayer):
      return s
    return None

  return jax.tree.map(layout, stats, is_leaf=_is_layout_leaf)


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


def join_path(module: str, name: str) -> str:
  return f'{module}/{name}' if module else name


def layer_table(tree: Any, layouts: Any = None) -> dict[str, dict[str, str]]:
  """The layers a row preconditioner can own: `{layer: {role: leaf path}}`.

  A layer is a `kernel` and maybe a `bias`, named by '/'-joined leaf paths.
  A Flax module dict is one layer named by its module path; a layer of a
  model that is not made of Flax modules is named by its kernel's leaf
  path, with the bias path its `ParamLayout` gives. A module the `layouts`
  mark as an `UncapturedLayer` is not a layer (it goes to the fallback).

  Args:
    tree: the parameter (or update) tree.
    layouts: the optimizer's `layouts` (see
      :func:`frog_optax.scale_by_row_preconditioner`).
  """
  leaves = {
    paths.path_name(paths.param_path(p)): leaf
    for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }
  by_path = layouts_by_path(layouts, tree)
  table = {
    m: {name: join_path(m, name) for name in module}
    for m, module in module_leaves(tree).items()
    if _is_row_layer(module)
    and not isinstance(by_path.get(m), stats_lib.UncapturedLayer)
  }
  at_leaves = {}
  for name, layout in by_path.items():
    if (
      isinstance(layout, stats_lib.ParamLayout)
      and getattr(leaves.get(name), 'ndim', 0) >= 2
    ):
      at_leaves[name] = {'kernel': name}
      if layout.bias_path is not None and layout.bias_path in leaves:
        at_leaves[name]['bias'] = layout.bias_path
  # A leaf belongs to one layer: layers named at kernel leaves win.
  claimed = {path for roles in at_leaves.values() for path in roles.values()}
  table = {
    m: roles
    for m, roles in table.items()
    if not claimed.intersection(roles.values())
  }
  return dict(sorted({**table, **at_leaves}.items()))


def owned_layers(
  table: dict[str, dict[str, str]], exclude: Sequence[str]
) -> dict[str, dict[str, str]]:
  """The entries of `table` not excluded; every `exclude` entry must match."""
  unmatched = [
    e for e in exclude if not any(is_excluded(m, (e,)) for m in table)
  ]
  if unmatched:
    candidates = list(table)
    raise ValueError(
      f'exclude entries {unmatched} match no Dense/Conv module; modules'
      f' that can be excluded: {candidates[:20]}'
      + (' ...' if len(candidates) > 20 else '')
    )
  return {m: roles for m, roles in table.items() if not is_excluded(m, exclude)}


def preconditioned_modules(
  params: Any, exclude: Sequence[str] = (), layouts: Any = None
) -> list[str]:
  """The '/'-joined paths of the modules FROG preconditions in `params`.

  Args:
    params: a parameter tree.
    exclude: module paths (or path prefixes) routed to the fallback instead.
    layouts: the optimizer's `layouts`, which also name the layers of
      models that are not Flax modules (see :mod:`frog_optax.jax`).

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
  return list(owned_layers(layer_table(params, layouts), exclude))


def leaf_paths(table: dict[str, dict[str, str]]) -> set[str]:
  """The paths of every leaf of the layers in `table`."""
  return {path for roles in table.values() for path in roles.values()}


def _labels(tree: Any, owned: dict[str, dict[str, str]]) -> Any:
  """`'frog'` at the leaves of the `owned` layers, `'fallback'` elsewhere."""
  leaves = leaf_paths(owned)
  return jax.tree_util.tree_map_with_path(
    lambda p, _: (
      PRECONDITIONED
      if paths.path_name(paths.param_path(p)) in leaves
      else FALLBACK
    ),
    tree,
  )


def frog_param_labels(
  params: Any, exclude: Sequence[str] = (), layouts: Any = None
) -> Any:
  """Labels every leaf `'frog'` (preconditioned) or `'fallback'`.

  Suitable for `optax.partition`; the same labels serve every member of the
  family.

  Example:
    >>> import jax.numpy as jnp, frog_optax as fo
    >>> params = {'conv': {'kernel': jnp.ones((3, 3, 1, 2))},
    ...           'norm': {'scale': jnp.ones(2)}}
    >>> fo.frog_param_labels(params)
    {'conv': {'kernel': 'frog'}, 'norm': {'scale': 'fallback'}}
  """
  exclude = validation.normalize_paths('exclude', exclude)
  return _labels(params, owned_layers(layer_table(params, layouts), exclude))


def _check_stats_owned(updates, frog_stats, exclude, table) -> None:
  """Stats at a kernel leaf that is not a layer of `table` are an error.

  Such stats come from a model that is not made of Flax modules; without
  `layouts` that name its layers, the optimizer would silently send them to
  the fallback.
  """
  leaves = {
    paths.path_name(paths.param_path(p))
    for p, _ in jax.tree_util.tree_flatten_with_path(updates)[0]
  }
  stray = [
    m
    for m in paths.entries_by_path(frog_stats, stats_lib.LayerStats)
    if m in leaves and m not in table and not is_excluded(m, exclude)
  ]
  if stray:
    raise ValueError(
      f'frog_stats has LayerStats for {stray[:10]}, which this optimizer'
      ' does not precondition: they sit at kernel leaves (a model that is'
      ' not made of Flax modules), whose layers the optimizer learns from'
      ' its layouts. Build it with layouts=fo.jax.layouts(loss_fn, params,'
      ' ...), or exclude them.'
    )


class RoutedTransformation(optax.GradientTransformationExtraArgs):
  """An optimizer of the family, which remembers its `exclude`.

  It is the `(init, update)` pair optax expects; the extra attribute lets
  :func:`frog_optax.describe` show the routing of the optimizer itself.
  """

  exclude: tuple[str, ...]
  layouts: Any


def layouts_of(optimizer: Any) -> Any:
  """The `layouts` an optimizer of this library was built with, or `None`."""
  if hasattr(optimizer, 'tx') and not isinstance(optimizer, (str, tuple)):
    optimizer = optimizer.tx  # nnx.Optimizer
  return getattr(optimizer, 'layouts', None)


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
  layouts: Any = None,
) -> RoutedTransformation:
  """Sends the owned layers to `preconditioned` and the rest to `fallback`.

  One update builds the layer table once: it labels the leaves for
  `optax.partition`, refuses stats of layers it does not own, and is handed
  to `preconditioned` as the extra argument `frog_layer_table` (the owned
  layers), so the shell need not build it again. Updates come back in the
  parameter dtypes (momentum may be wider); integer parameters are refused
  at `init`, where the cast would truncate every update to zero.
  """
  if not isinstance(fallback, optax.GradientTransformation):
    raise ValueError(
      f'fallback must be an optax.GradientTransformation; got {fallback!r}.'
    )
  exclude = tuple(exclude)
  groups = {PRECONDITIONED: preconditioned, FALLBACK: fallback}

  def split(tree):
    """The owned layers of `tree`, and the partition they label."""
    table = layer_table(tree, layouts)
    owned = owned_layers(table, exclude)
    labels = _labels(tree, owned)
    # A function: a labels tree that is callable (an Equinox module) would
    # be called by optax.partition.
    return table, owned, optax.partition(groups, lambda _: labels)

  def init_fn(params):
    validation.check_float_params(params)
    return split(params)[2].init(params)

  def update_fn(updates, state, params=None, **extra):
    table, owned, partition = split(updates)
    if extra.get('frog_stats') is not None:
      _check_stats_owned(updates, extra['frog_stats'], exclude, table)
    extra['frog_layer_table'] = owned
    updates, state = partition.update(updates, state, params, **extra)
    if params is not None:
      updates = jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params)
    return updates, state

  routed = RoutedTransformation(init_fn, update_fn)
  routed.exclude = exclude
  routed.layouts = layouts
  return routed
