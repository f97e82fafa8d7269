"""The shell every member of the family shares: one optax transformation.

A member (FROG, K-FROG, FOOF, AdaFisher) is only a `LayerPreconditioner`:
how to initialise its per-layer state, and how to turn one layer's direction
(the momentum) into an update given that layer's captured statistics. The
shell does everything else the same way for all of them: it picks the
Dense/Conv-like modules (`routing`), requires `frog_stats` and names what is
missing, maps the rule over (stats, directions, state) with `LayerStats` as
leaves, checks that stats belong to their parameters, keeps a step count,
and leaves every other leaf unchanged. It also views each layer in the
row-stacked form the members work on: a kernel whose last axis is the rows
(a `DenseGeneral` or `Einsum` kernel transposed and reshaped to
`(D_in, rows)`, as its `ParamLayout` says) and a `(rows,)` bias, one layer
at a time under `jax.vmap` for `nn.scan` stacks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from frog_optax._src import paths
from frog_optax._src import routing
from frog_optax._src import scopes
from frog_optax._src import stats as stats_lib
from frog_optax._src import validation
from frog_optax._src.geometry import RowParams

_MISSING = object()


# ----------------------------------------------------------------------------
# A layer's leaves, in the row-stacked form and back.


def layer_leaves(tree: Any, table: dict[str, dict[str, str]]) -> dict:
  """`{layer: {'kernel': leaf, 'bias'?: leaf}}` of the layers in `table`."""
  leaves = {
    paths.path_name(paths.param_path(p)): leaf
    for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }
  return {
    layer: {role: leaves[path] for role, path in roles.items()}
    for layer, roles in table.items()
  }


def replace_layers(
  tree: Any, table: dict[str, dict[str, str]], new: dict[str, dict]
) -> Any:
  """`tree` with the leaves of the layers in `new` replaced."""
  by_leaf = {
    path: new[layer][role]
    for layer in new
    for role, path in table[layer].items()
  }
  return jax.tree_util.tree_map_with_path(
    lambda p, leaf: by_leaf.get(paths.path_name(paths.param_path(p)), leaf),
    tree,
  )


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


# ----------------------------------------------------------------------------
# The shell.


class LayerPreconditioner(NamedTuple):
  """One member of the family, layer by layer.

  Attributes:
    init: `(leaves) -> state` for one preconditioned module, where `leaves`
      is its `{'kernel', 'bias'?}` dict; `None` for a stateless member.
    update: `(name, layer_stats, direction, state, count) -> (u, state)`:
      the update of one module (with the structure of `direction`) and its
      new state. The shell hands `direction` over in the solve dtype (at
      least float32) and casts `u` back to the dtypes of the momentum.
      `count` is the number of previous updates.
  """

  init: Callable[[RowParams], Any]
  update: Callable[
    [str, stats_lib.LayerStats, RowParams, Any, jax.Array],
    tuple[RowParams, Any],
  ]


class RowPreconditionerState(NamedTuple):
  """State of a family member's preconditioning step."""

  count: chex.Array  # shape=(), dtype=jnp.int32.
  # The member's state of each layer where the stats tree has its
  # LayerStats (the module dict, or the kernel leaf), None elsewhere.
  layers: Any


def _check_layer_shapes(name, layer_stats, leaves):
  """Stats must describe these parameters: rows, inputs and layer kind."""
  layout = layer_stats.layout
  geometry = layer_stats.geometry
  k = layout.stacked_axes
  kernel_shape = leaves['kernel'].shape
  x_shape = layer_stats.inputs.shape
  dy_shape = layer_stats.output_grads.shape
  row_stacked = row_stacked_kernel_shape(kernel_shape, layout)

  def fail(why):
    raise ValueError(
      f'frog_stats for {name!r} do not belong to its parameters: {why}'
      f' (kernel {kernel_shape}, stats inputs {x_shape}, output gradients'
      f' {dy_shape}, {type(geometry).__name__}, layout {layout}). Pass the'
      ' stats that value_and_grad returned for the same model.'
    )

  if row_stacked is None:
    fail('the layout does not fit the kernel')
  if row_stacked[-1] != dy_shape[-1] or row_stacked[:k] != dy_shape[:k]:
    fail(f'they have {dy_shape[-1]} rows, the kernel {row_stacked[-1]}')
  mismatch = geometry.kernel_mismatch(x_shape[k:], row_stacked[k:])
  if mismatch:
    fail(mismatch)


def _missing_stats_error(missing, uncaptured) -> ValueError:
  """Why modules have no stats: not captured (and why), or no capture."""
  lines = []
  cannot = {m: uncaptured[m] for m in missing if m in uncaptured}
  if cannot:
    lines.append(
      'frog_optax did not capture these layers: '
      + '; '.join(
        f'{m!r} ({u.layer_type}: {u.reason})' for m, u in cannot.items()
      )
      + '.'
    )
    if any(u.reason == stats_lib.UNKNOWN_TYPE for u in cannot.values()):
      lines.append(
        'It captures nn.Dense, nn.DenseGeneral, nn.Einsum and nn.Conv'
        ' (linen) and nnx.Linear, nnx.LinearGeneral, nnx.Einsum and nnx.Conv'
        ' (NNX).'
      )
  other = [m for m in missing if m not in cannot]
  if other:
    lines.append(
      f'frog_stats has no LayerStats for {[m + "/kernel" for m in other]}:'
      " capture them (wrap the model's apply with frog_optax.linen.capture,"
      ' or use frog_optax.nnx.value_and_grad).'
    )
  lines.append(
    'To send them to the fallback optimizer instead, pass'
    f' exclude={tuple(missing)!r} to the optimizer.'
  )
  return ValueError(' '.join(lines))


def _layout_mismatch(name, init_layout, layout) -> ValueError:
  return ValueError(
    f'The optimizer state of {name!r} was built for the layout'
    f' {init_layout}, but its stats have the layout {layout} (a'
    ' DenseGeneral, Einsum or scan-stacked module). Pass the layouts to the'
    ' optimizer, e.g. layouts=fo.linen.layouts(loss_fn, params, ...) (or'
    ' fo.nnx.layouts(loss_fn, model, ...), or a stats tree), or route it to'
    f' the fallback with exclude=({name!r},).'
  )


def _stats_of(chosen, frog_stats) -> dict[str, stats_lib.LayerStats]:
  """`{module: LayerStats}` of the chosen modules, or an error saying why."""
  if frog_stats is _MISSING:
    raise ValueError(
      'This optimizer needs the keyword argument frog_stats (from'
      ' frog_optax.linen.value_and_grad or frog_optax.nnx.value_and_grad)'
      f' to precondition {[m + "/kernel" for m in chosen][:10]}: call'
      ' tx.update(grads, state, params, frog_stats=stats). With linen,'
      " flax.training.train_state.TrainState's apply_gradients does not"
      ' pass it on; use frog_optax.linen.TrainState, whose'
      ' apply_gradients(grads=..., frog_stats=...) does.'
    )
  by_path = paths.entries_by_path(frog_stats, stats_lib.LayerStats)
  missing = [m for m in chosen if m not in by_path]
  if missing:
    uncaptured = paths.entries_by_path(frog_stats, stats_lib.UncapturedLayer)
    raise _missing_stats_error(missing, uncaptured)
  return by_path


def _is_layer_stats(x: Any) -> bool:
  return isinstance(x, stats_lib.LayerStats)


def _check_state_fits(owned_stats: Any, layers: Any) -> None:
  """`layers` must hold a state where each layer's stats are, else `None`."""
  try:
    jax.tree.map(lambda *_: None, owned_stats, layers, is_leaf=_is_layer_stats)
  except (ValueError, TypeError) as e:
    raise ValueError(
      'The optimizer state was initialised with other parameters (or'
      f' other `exclude` settings) than those it updates: {e}'
    ) from None


def scale_by_row_preconditioner(
  preconditioner: LayerPreconditioner,
  layouts: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Applies `preconditioner` to every Dense/Conv-like module it is given.

  Only the aliases route (`exclude`, the fallback): under them this
  transformation sees the owned layers alone, which the routing hands down
  as the extra argument `frog_layer_table`; on its own it preconditions
  every Dense/Conv-like module of the tree (split a tree yourself with
  `optax.partition` and :func:`frog_optax.frog_param_labels`).

  Args:
    preconditioner: the member's per-layer rule.
    layouts: which kernel axes of each module are rows, known at `init`:
      `None` (plain Dense/Conv kernels), a params-prefix tree of
      `ParamLayout`s or `LayerStats` (e.g. the stats of one step, or
      :func:`frog_optax.linen.layouts`), or a function of the parameters
      returning one. A member with per-layer state builds it in that
      row-stacked form (per layer of a `nn.scan` stack); stats whose layout
      differs from it are an error.

  Returns:
    A transformation whose `update` requires the keyword argument
    `frog_stats` (the stats tree of :func:`frog_optax.linen.value_and_grad`)
    and ignores other extra arguments. Its state's `layers` has the
    structure of the stats tree: each layer's state where its `LayerStats`
    sit, `None` elsewhere.

  Example:
    A new member is one function: here, rows scaled by the inverse root
    mean square of their output gradients (and a step counter as state).

    >>> import jax.numpy as jnp, frog_optax as fo
    >>> def update(name, stats, direction, seen, count):
    ...   rms = jnp.sqrt(jnp.mean(stats.output_grads ** 2, axis=0))
    ...   return {k: v / rms for k, v in direction.items()}, seen + 1
    >>> tx = fo.scale_by_row_preconditioner(fo.LayerPreconditioner(
    ...     init=lambda leaves: jnp.zeros([], jnp.int32), update=update))
    >>> params = {'Dense_0': {'kernel': jnp.ones((3, 2))}}
    >>> stats = {'Dense_0': fo.LayerStats(
    ...     inputs=jnp.ones((4, 3)), output_grads=2 * jnp.ones((4, 2)),
    ...     geometry=fo.DenseGeometry())}
    >>> u, state = tx.update(params, tx.init(params), frog_stats=stats)
    >>> u['Dense_0']['kernel'][0].tolist(), int(state.layers['Dense_0'])
    ([0.5, 0.5], 1)
  """

  def init_module(name, leaves, layout):
    """The member's state of one module, in its row-stacked form."""
    shape = leaves['kernel'].shape
    if row_stacked_kernel_shape(shape, layout) is None:
      raise ValueError(
        f'layouts gives {name!r} the layout {layout}, which does not fit its'
        f' kernel of shape {shape}.'
      )
    return per_layer(preconditioner.init, layout)(
      to_row_stacked(leaves, layout)
    )

  def init_fn(params):
    table = routing.layer_table(params, layouts)
    modules = layer_leaves(params, table)
    validation.check_float_params(params, routing.leaf_paths(table))
    init_layouts = routing.layouts_by_path(layouts, params)
    layers = {
      m: init_module(
        m, modules[m], init_layouts.get(m, stats_lib.ParamLayout())
      )
      for m in table
    }
    return RowPreconditionerState(
      count=jnp.zeros([], jnp.int32), layers=paths.place(params, layers)
    )

  def update_module(name, leaves, layer_stats, layer_state, count):
    """One module: to the solve dtype and row-stacked form, the member's
    rule (per layer of a stack), and back to the parameters' form."""
    layout = layer_stats.layout
    dtype = solve_dtype(leaves)
    direction = to_row_stacked(
      {k: v.astype(dtype) for k, v in leaves.items()}, layout
    )
    rule = lambda s, d, st: preconditioner.update(name, s, d, st, count)
    with jax.named_scope(scopes.LAYER):
      # Under per_layer each call sees one layer: no stacked axes.
      one_layer = dataclasses.replace(
        layer_stats, layout=stats_lib.ParamLayout()
      )
      u, layer_state = per_layer(rule, layout)(
        one_layer, direction, layer_state
      )
    u = from_row_stacked(u, layout, leaves)
    return {k: u[k].astype(v.dtype) for k, v in leaves.items()}, layer_state

  def update_fn(
    updates,
    state,
    params=None,
    *,
    frog_stats=_MISSING,
    frog_layer_table=None,
    **extra,
  ):
    del params, extra
    table = frog_layer_table
    if table is None:  # not under an alias's routing: every row layer
      table = routing.layer_table(updates, layouts)
    by_path = _stats_of(list(table), frog_stats)
    # The stats of this transformation's layers on the nesting its state
    # has (a stats tree may also hold excluded and refused layers).
    owned_stats = paths.place(updates, {m: by_path[m] for m in table})
    _check_state_fits(owned_stats, state.layers)
    # Each layer's leaves where its stats are: a layer's bias may sit
    # elsewhere in the tree (a model that is not made of Flax modules).
    directions = paths.place(updates, layer_leaves(updates, table))
    # Only a layer's state fixes its layout; a stateless member reads it
    # from the stats alone, and never reads the layouts here.
    init_layouts = functools.cache(
      lambda: routing.layouts_by_path(layouts, updates)
    )
    new_leaves = {}

    def update_layer(path, layer_stats, direction, layer_state):
      name = paths.path_name(path)
      _check_layer_shapes(name, layer_stats, direction)
      if layer_state is not None:
        init_layout = init_layouts().get(name, stats_lib.ParamLayout())
        if layer_stats.layout != init_layout:
          raise _layout_mismatch(name, init_layout, layer_stats.layout)
      new_leaves[name], layer_state = update_module(
        name, direction, layer_stats, layer_state, state.count
      )
      return layer_state

    layers = jax.tree_util.tree_map_with_path(
      update_layer,
      owned_stats,
      directions,
      state.layers,
      is_leaf=_is_layer_stats,
    )
    new_state = RowPreconditionerState(
      count=optax.safe_increment(state.count), layers=layers
    )
    return replace_layers(updates, table, new_leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def solve_dtype(direction: RowParams):
  """Solves run in at least float32 (float64 stays float64)."""
  return jnp.promote_types(direction['kernel'].dtype, jnp.float32)
