"""The shell every member of the family shares: one optax transformation.

A member (FROG, K-FROG, FOOF, AdaFisher) is only a `LayerPreconditioner`:
how to initialise its per-layer state, and how to turn one layer's direction
(the momentum) into an update given that layer's captured statistics. The
shell does everything else the same way for all of them: it picks the
Dense/Conv-like modules (`routing`), requires `frog_stats` and names what is
missing, checks that stats belong to their parameters, keeps a step count,
and leaves every other leaf unchanged.
"""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from frog_optax._src import layouts
from frog_optax._src import routing
from frog_optax._src import stats as stats_lib
from frog_optax._src import validation

RowParams = dict[str, jax.Array]
_MISSING = object()


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
  layers: dict[str, Any]  # {module path: the member's state for it}


def _check_layer_shapes(name, layer_stats, leaves):
  layout = layer_stats.layout
  kernel_shape = leaves['kernel'].shape
  dy_shape = layer_stats.output_grads.shape
  row_stacked = layouts.row_stacked_kernel_shape(kernel_shape, layout)
  if (
    row_stacked is None
    or row_stacked[-1] != dy_shape[-1]
    or row_stacked[: layout.stacked_axes] != dy_shape[: layout.stacked_axes]
  ):
    raise ValueError(
      f'frog_stats for {name!r} has output gradients of shape {dy_shape}'
      f' (layout {layout}) but its kernel has shape {kernel_shape}: the'
      ' stats do not belong to these parameters.'
    )


def _check_layout_state(name, preconditioner, row_stacked, layout, state):
  """State made by `init` from the raw kernel must fit the layout's view."""
  expected = jax.eval_shape(
    layouts.per_layer(preconditioner.init, layout), row_stacked
  )
  shapes = lambda tree: jax.tree.map(lambda a: a.shape, tree)
  if jax.tree.structure(expected) != jax.tree.structure(state) or shapes(
    expected
  ) != shapes(state):
    raise ValueError(
      f'{name!r} is a DenseGeneral, Einsum or nn.scan-stacked module (layout'
      f' {layout}): this optimizer keeps per-layer state whose shape depends'
      ' on that layout, and `init`, which sees only the parameters, made it'
      ' for a plain Dense/Conv kernel. Precondition such modules with'
      ' frog_optax.frog (stateless), or route them to the fallback with'
      f' exclude=({name!r},).'
    )


def scale_by_row_preconditioner(
  preconditioner: LayerPreconditioner,
  exclude: Sequence[str] = (),
) -> optax.GradientTransformationExtraArgs:
  """Applies `preconditioner` to every Dense/Conv-like module not excluded.

  Args:
    preconditioner: the member's per-layer rule.
    exclude: normalised module paths that pass through unchanged.

  Returns:
    A transformation whose `update` requires the keyword argument
    `frog_stats` (the stats tree of :func:`frog_optax.linen.value_and_grad`)
    and ignores other extra arguments.

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

  def chosen_modules(modules):
    return [
      m
      for m in routing.row_layers(modules)
      if not routing.is_excluded(m, exclude)
    ]

  def init_fn(params):
    routing.preconditioned_modules(params, exclude)  # validates `exclude`
    modules = routing.module_leaves(params)
    layers = {}
    for m in chosen_modules(modules):
      layer_state = preconditioner.init(modules[m])
      if layer_state is not None:
        layers[m] = layer_state
    return RowPreconditionerState(count=jnp.zeros([], jnp.int32), layers=layers)

  def update_fn(updates, state, params=None, *, frog_stats=_MISSING, **extra):
    del params, extra
    modules = routing.module_leaves(updates)
    chosen = chosen_modules(modules)
    if frog_stats is _MISSING:
      raise ValueError(
        'This optimizer needs the keyword argument frog_stats (from'
        ' frog_optax.linen.value_and_grad) to precondition'
        f' {[m + "/kernel" for m in chosen][:10]}.'
      )
    by_path = stats_lib.stats_by_path(frog_stats)
    missing = [m for m in chosen if m not in by_path]
    if missing:
      raise ValueError(
        'frog_stats has no LayerStats for the preconditioned parameters'
        f' {[m + "/kernel" for m in missing]}. Capture these layers with'
        ' frog_optax.linen.capture, or route them to the fallback with'
        f' exclude={tuple(missing)!r}.'
      )
    new_leaves = {}
    layers = dict(state.layers)
    for m in chosen:
      leaves, layer_stats = modules[m], by_path[m]
      _check_layer_shapes(m, layer_stats, leaves)
      if m not in state.layers and preconditioner.init(leaves) is not None:
        raise ValueError(
          f'The optimizer state has no entry for {m!r}: it was initialised'
          ' with other parameters (or other `exclude` settings) than those'
          f' it updates; state entries: {sorted(state.layers)[:10]}.'
        )
      layout = layer_stats.layout
      dtype = solve_dtype(leaves)
      direction = layouts.to_row_stacked(
        {k: v.astype(dtype) for k, v in leaves.items()}, layout
      )
      if m in state.layers and not layout.is_row_stacked:
        _check_layout_state(
          m, preconditioner, direction, layout, state.layers[m]
        )
      update_one = lambda s, d, st, m=m: preconditioner.update(
        m, s, d, st, state.count
      )
      u, layer_state = layouts.per_layer(update_one, layout)(
        layouts.layer_stats(layer_stats), direction, state.layers.get(m)
      )
      u = layouts.from_row_stacked(u, layout, leaves)
      new_leaves[m] = {k: u[k].astype(v.dtype) for k, v in leaves.items()}
      if layer_state is not None:
        layers[m] = layer_state

    def replace(path, leaf):
      module, name = stats_lib.module_and_leaf(path)
      if module in new_leaves:
        return new_leaves[module][name]
      return leaf

    updates = jax.tree_util.tree_map_with_path(replace, updates)
    new_state = RowPreconditionerState(
      count=optax.safe_increment(state.count), layers=layers
    )
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def schedule_value(value: optax.ScalarOrSchedule, count: jax.Array):
  """A hyper-parameter at step `count`: calls schedules, passes numbers."""
  return value(count) if callable(value) else value


def scaled(learning_rate: optax.ScalarOrSchedule, ratio: Any):
  """`learning_rate * ratio`, keeping schedules schedules."""
  if callable(learning_rate):
    return lambda count: learning_rate(count) * ratio
  return learning_rate * ratio


def solve_dtype(direction: RowParams):
  """Solves run in at least float32 (float64 stays float64)."""
  return jnp.promote_types(direction['kernel'].dtype, jnp.float32)


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
    optax.trace(decay=momentum, nesterov=nesterov, accumulator_dtype=mu_dtype),
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
) -> optax.GradientTransformationExtraArgs:
  """momentum → `scale_by` → decoupled weight decay → learning rate.

  The alias shape of FROG, K-FROG and FOOF. Parameters `scale_by` does not
  own go to `fallback`, by default the reference's momentum SGD at
  `learning_rate * other_lr_ratio` with coupled weight decay.
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
    optax.trace(decay=momentum, nesterov=nesterov, accumulator_dtype=mu_dtype),
    scale_by,
    optax.add_decayed_weights(weight_decay, weight_decay_mask),
    optax.scale_by_learning_rate(learning_rate),
  )
  return routing.route(preconditioned, fallback, exclude)
