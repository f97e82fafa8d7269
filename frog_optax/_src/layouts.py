"""Views of a module's parameters in the row-stacked form, and back.

Every member of the family works on one layer whose kernel ends in its rows
(output features) and whose bias is `(rows,)`. A `DenseGeneral` or `Einsum`
kernel is brought to that form by a transpose and a reshape to
`(D_in, rows)`; `nn.scan`-stacked modules are handled one layer at a time by
`jax.vmap` over their leading layer axes. Both are described by the
`ParamLayout` the capture attaches to each `LayerStats`.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from frog_optax._src import paths
from frog_optax._src import stats as stats_lib
from frog_optax._src.geometry import RowParams


def _permuted_kernel_shape(shape, layout: stats_lib.ParamLayout):
  k = layout.stacked_axes
  perm = layout.kernel_perm or tuple(range(len(shape) - k))
  return shape[:k] + tuple(shape[k + p] for p in perm)


def _is_identity(layout: stats_lib.ParamLayout) -> bool:
  """Whether the module's parameters already are in the row-stacked form."""
  return layout.num_input_axes is None and layout.kernel_perm is None


def _full_perm(layout: stats_lib.ParamLayout) -> tuple[int, ...]:
  k = layout.stacked_axes
  return tuple(range(k)) + tuple(k + p for p in layout.kernel_perm)


def row_stacked_kernel_shape(
  shape: tuple[int, ...], layout: stats_lib.ParamLayout
) -> tuple[int, ...] | None:
  """The kernel shape :func:`to_row_stacked` gives; `None` if it cannot."""
  k, n_in = layout.stacked_axes, layout.num_input_axes
  inner_ndim = len(shape) - k
  if inner_ndim < 2:
    return None
  if layout.kernel_perm is not None and len(layout.kernel_perm) != inner_ndim:
    return None
  if n_in is None:
    return _permuted_kernel_shape(tuple(shape), layout)
  if not 0 < n_in < inner_ndim:
    return None
  inner = _permuted_kernel_shape(shape, layout)[k:]
  return shape[:k] + (math.prod(inner[:n_in]), math.prod(inner[n_in:]))


def to_row_stacked(
  leaves: RowParams, layout: stats_lib.ParamLayout
) -> RowParams:
  """`{'kernel', 'bias'?}` as `(*stack, ..., rows)` and `(*stack, rows)`."""
  if _is_identity(layout):
    return dict(leaves)
  k = layout.stacked_axes
  kernel = leaves['kernel']
  if layout.kernel_perm is not None:
    kernel = jnp.transpose(kernel, _full_perm(layout))
  stack, inner = kernel.shape[:k], kernel.shape[k:]
  n_in = layout.num_input_axes
  if n_in is not None:
    kernel = kernel.reshape(
      stack + (math.prod(inner[:n_in]), math.prod(inner[n_in:]))
    )
  out = {'kernel': kernel}
  if 'bias' in leaves:  # e.g. an Equinox Conv2d bias (rows, 1, 1)
    out['bias'] = leaves['bias'].reshape(stack + (-1,))
  return out


def from_row_stacked(
  row_stacked: RowParams, layout: stats_lib.ParamLayout, like: RowParams
) -> RowParams:
  """Inverse of :func:`to_row_stacked`, with the shapes of `like`."""
  if _is_identity(layout):
    return dict(row_stacked)
  kernel_shape = like['kernel'].shape
  kernel = row_stacked['kernel'].reshape(
    _permuted_kernel_shape(kernel_shape, layout)
  )
  if layout.kernel_perm is not None:
    inverse = tuple(np.argsort(_full_perm(layout)))
    kernel = jnp.transpose(kernel, inverse)
  out = {'kernel': kernel}
  if 'bias' in row_stacked:
    out['bias'] = row_stacked['bias'].reshape(like['bias'].shape)
  return out


def per_layer(fn: Callable[..., Any], layout: stats_lib.ParamLayout):
  """`fn` mapped over the stacked layer axes of all its arguments."""
  for _ in range(layout.stacked_axes):
    fn = jax.vmap(fn)
  return fn


def layer_stats(stats: stats_lib.LayerStats) -> stats_lib.LayerStats:
  """The stats of one layer of the stack (for use under :func:`per_layer`)."""
  return stats_lib.LayerStats(
    inputs=stats.inputs,
    output_grads=stats.output_grads,
    geometry=stats.geometry,
  )


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


def layouts_by_path(
  layouts: Any, params: Any
) -> dict[str, stats_lib.ParamLayout]:
  """`{module path: ParamLayout}` from an optimizer's `layouts` argument.

  Args:
    layouts: `None` (every module row-stacked: plain Dense/Conv), a
      params-prefix tree holding a `ParamLayout` (or a `LayerStats`, whose
      layout is taken) per module, or a function of the parameters that
      returns one.
    params: the parameter tree (for a function).
  """
  if layouts is None:
    return {}
  tree = _resolve(layouts, params)
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_layout_leaf)
  out = {}
  for path, leaf in flat:
    if isinstance(leaf, stats_lib.LayerStats):
      leaf = leaf.layout
    if isinstance(leaf, stats_lib.ParamLayout):
      out[paths.path_name(path)] = leaf
  return out


def uncaptured_paths(layouts: Any, params: Any) -> set[str]:
  """The paths that `layouts` mark as `UncapturedLayer` (fallback)."""
  if layouts is None:
    return set()
  tree = _resolve(layouts, params)
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_layout_leaf)
  return {
    paths.path_name(path)
    for path, leaf in flat
    if isinstance(leaf, stats_lib.UncapturedLayer)
  }


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
