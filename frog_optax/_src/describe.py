"""A human-readable table of how FROG treats each parameter."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from frog_optax._src import family
from frog_optax._src import fisher
from frog_optax._src import paths
from frog_optax._src import routing
from frog_optax._src import stats as stats_lib


def _row_size(leaves, layer_stats) -> int:
  """D of one row, in the row-stacked form the stats' layout gives."""
  if layer_stats is None:
    return fisher.row_dimension(leaves)
  layout = layer_stats.layout
  shape = family.row_stacked_kernel_shape(np.shape(leaves['kernel']), layout)
  if shape is None:  # stats of other parameters: the update will say so
    return fisher.row_dimension(leaves)
  return math.prod(shape[layout.stacked_axes : -1]) + ('bias' in leaves)


def _entry(name, leaves, route, why):
  return {
    'module': name or '/',
    'parameters': ', '.join(
      f'{leaf}{tuple(np.shape(v))}' for leaf, v in sorted(leaves.items())
    ),
    'route': route,
    'why': why,
    'row_size': None,
    'samples': None,
  }


def describe_rows(
  params: Any, stats: Any, exclude: Any = ()
) -> list[dict[str, Any]]:
  """One dict per layer or module: path, shapes, route, row size D, samples.

  `samples` counts the (example, location) pairs behind each row's Fisher;
  when it is below D the row Fisher is rank-deficient and damping alone
  bounds the step in the unseen directions. The routing is the optimizer's
  (with its `layouts`) when `exclude` is an optimizer; else the layers are
  those of `params` and of the stats.
  """
  layouts = routing.layouts_of(exclude)
  exclude = routing.exclude_of(exclude)
  if layouts is None:  # stats at kernel leaves name their layers
    layouts = routing.layout_tree(stats)
  table = routing.layer_table(params, layouts)
  chosen = set(routing.preconditioned_modules(params, exclude, layouts))
  by_path = paths.entries_by_path(stats, stats_lib.LayerStats)
  uncaptured = paths.entries_by_path(stats, stats_lib.UncapturedLayer)
  owned = {path for roles in table.values() for path in roles.values()}
  layers = family.layer_leaves(params, table)
  rows = []
  for module, leaves in layers.items():
    # Leaf-level layers show their own leaf names (e.g. weight, bias).
    shown = {
      table[module][role].rpartition('/')[2]: v for role, v in leaves.items()
    }
    entry = _entry(module, shown, 'fallback', '')
    layer_stats = by_path.get(module)
    entry['row_size'] = _row_size(leaves, layer_stats)
    if layer_stats is not None:
      entry['samples'] = layer_stats.num_samples
    not_captured = uncaptured.get(module)
    if not_captured is not None:
      not_captured = (
        f'not captured ({not_captured.layer_type}: {not_captured.reason})'
      )
    if module not in chosen:
      entry['why'] = 'excluded' + (f'; {not_captured}' if not_captured else '')
    elif not_captured:
      entry['route'] = 'ERROR'
      entry['why'] = f'{not_captured}: update will fail unless excluded'
    elif layer_stats is None:
      entry['route'] = 'ERROR'
      entry['why'] = 'no stats: update will fail'
    else:
      entry['route'] = 'frog'
      entry['why'] = (
        'rank-deficient Fisher (samples < D): rank_damping·D/samples applies'
        if entry['samples'] < entry['row_size']
        else ''
      )
    rows.append(entry)
  for module, leaves in routing.module_leaves(params).items():
    rest = {
      name: v
      for name, v in leaves.items()
      if routing.join_path(module, name) not in owned
    }
    if not rest:
      continue
    whole = uncaptured.get(module)
    if whole is not None:
      reasons = [f'not captured ({whole.layer_type}: {whole.reason})']
    else:
      reasons = [
        f'{name}: not captured ({u.layer_type}: {u.reason})'
        for name in sorted(rest)
        for u in [uncaptured.get(routing.join_path(module, name))]
        if u is not None
      ]
    rows.append(
      _entry(
        module,
        rest,
        'fallback',
        '; '.join(reasons) or 'not a Dense/Conv kernel',
      )
    )
  return sorted(rows, key=lambda r: r['module'])


def describe(params: Any, stats: Any, exclude: Any = ()) -> str:
  """A table of which parameters FROG preconditions and which fall back.

  Args:
    params: the parameter tree.
    stats: the stats tree from :func:`frog_optax.linen.value_and_grad`.
    exclude: the optimizer (e.g. `fo.frog(...)`, or an `nnx.Optimizer`
      holding it), whose routing is then shown, or the `exclude` it was
      built with.

  Returns:
    A plain-text table, one line per module.

  Example:
    >>> import jax.numpy as jnp, frog_optax as fo
    >>> params = {'conv': {'kernel': jnp.ones((3, 3, 1, 2))},
    ...           'head': {'kernel': jnp.ones((2, 2))}}
    >>> stats = {'conv': None, 'head': None}
    >>> print(fo.describe(params, stats, exclude='head'))  # doctest: +ELLIPSIS
    module  parameters          route     D  samples  note
    ------  ------------------  --------  -  -------  ---...
    conv    kernel(3, 3, 1, 2)  ERROR     9           no stats: update will fail
    head    kernel(2, 2)        fallback  2           excluded
  """
  rows = describe_rows(params, stats, exclude)
  header = ('module', 'parameters', 'route', 'D', 'samples', 'note')
  table = [header] + [
    (
      r['module'],
      r['parameters'],
      r['route'],
      '' if r['row_size'] is None else str(r['row_size']),
      '' if r['samples'] is None else str(r['samples']),
      r['why'],
    )
    for r in rows
  ]
  widths = [max(len(row[i]) for row in table) for i in range(len(header))]
  lines = [
    '  '.join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table
  ]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)
