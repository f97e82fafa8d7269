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

from frog_optax._src import layouts as layouts_lib
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
  """Stats must describe these parameters: rows, inputs and layer kind."""
  layout = layer_stats.layout
  geometry = layer_stats.geometry
  k = layout.stacked_axes
  kernel_shape = leaves['kernel'].shape
  x_shape = layer_stats.inputs.shape
  dy_shape = layer_stats.output_grads.shape
  row_stacked = layouts_lib.row_stacked_kernel_shape(kernel_shape, layout)

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
  if isinstance(geometry, stats_lib.ConvGeometry):
    ndim = geometry.num_spatial_dims + 2
    if len(row_stacked) - k != ndim or len(x_shape) - k != ndim:
      fail(
        f'they are stats of a {geometry.num_spatial_dims}-D convolution'
        f' and the kernel has {len(row_stacked) - k} axes'
      )
    groups = geometry.feature_group_count
    if x_shape[-1] != row_stacked[-2] * groups or row_stacked[-1] % groups:
      fail(
        f'their inputs have {x_shape[-1]} channels, the kernel expects'
        f' {row_stacked[-2]} per group × {groups} groups'
      )
  else:
    if len(row_stacked) - k != 2 or len(x_shape) - k != 2:
      fail('they are stats of a Dense layer and the kernel is not one')
    if x_shape[-1] != row_stacked[-2]:
      fail(
        f'their inputs have {x_shape[-1]} features, the kernel expects'
        f' {row_stacked[-2]}'
      )


def _missing_stats_error(missing, uncaptured) -> ValueError:
  """Why modules have no stats: an uncapturable type, or no capture."""
  lines = []
  cannot = {m: uncaptured[m] for m in missing if m in uncaptured}
  if cannot:
    lines.append(
      'frog_optax cannot capture these layers:'
      f' {", ".join(f"{m!r} ({t})" for m, t in cannot.items())}. It'
      ' captures nn.Dense, nn.DenseGeneral, nn.Einsum and nn.Conv (linen)'
      ' and nnx.Linear, nnx.LinearGeneral, nnx.Einsum and nnx.Conv (NNX).'
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
    f' exclude={tuple(missing)!r}.'
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


def scale_by_row_preconditioner(
  preconditioner: LayerPreconditioner,
  exclude: Sequence[str] = (),
  layouts: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Applies `preconditioner` to every Dense/Conv-like module not excluded.

  Args:
    preconditioner: the member's per-layer rule.
    exclude: normalised module paths that pass through unchanged.
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
    validation.check_float_params(params, set(chosen_modules(modules)))
    by_path = layouts_lib.layouts_by_path(layouts, params)
    layers = {}
    for m in chosen_modules(modules):
      layout = by_path.get(m, stats_lib.ParamLayout())
      leaves = modules[m]
      if (
        layouts_lib.row_stacked_kernel_shape(leaves['kernel'].shape, layout)
        is None
      ):
        raise ValueError(
          f'layouts gives {m!r} the layout {layout}, which does not fit its'
          f' kernel of shape {leaves["kernel"].shape}.'
        )
      layer_state = layouts_lib.per_layer(preconditioner.init, layout)(
        layouts_lib.to_row_stacked(leaves, layout)
      )
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
        ' frog_optax.linen.value_and_grad or frog_optax.nnx.value_and_grad)'
        f' to precondition {[m + "/kernel" for m in chosen][:10]}: call'
        ' tx.update(grads, state, params, frog_stats=stats). With linen,'
        " flax.training.train_state.TrainState's apply_gradients does not"
        ' pass it on; use frog_optax.linen.TrainState, whose'
        ' apply_gradients(grads=..., frog_stats=...) does.'
      )
    validation.check_float_params(updates, set(chosen))
    by_path = stats_lib.stats_by_path(frog_stats)
    missing = [m for m in chosen if m not in by_path]
    if missing:
      uncaptured = stats_lib.stats_by_path(
        frog_stats, stats_lib.UncapturedLayer
      )
      raise _missing_stats_error(
        missing, {m: u.layer_type for m, u in uncaptured.items()}
      )
    new_leaves = {}
    layers = dict(state.layers)
    init_layouts = layouts_lib.layouts_by_path(layouts, updates)
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
      direction = layouts_lib.to_row_stacked(
        {k: v.astype(dtype) for k, v in leaves.items()}, layout
      )
      init_layout = init_layouts.get(m, stats_lib.ParamLayout())
      if m in state.layers and layout != init_layout:
        raise _layout_mismatch(m, init_layout, layout)
      update_one = lambda s, d, st, m=m: preconditioner.update(
        m, s, d, st, state.count
      )
      u, layer_state = layouts_lib.per_layer(update_one, layout)(
        layouts_lib.layer_stats(layer_stats), direction, state.layers.get(m)
      )
      u = layouts_lib.from_row_stacked(u, layout, leaves)
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


def nonnegative_or_nan(value: Any) -> jax.Array:
  """`value`, or NaN where it is negative.

  For values that cannot be checked at construction (schedules, traced
  hyper-parameters): an invalid damping must make the step visibly
  non-finite (and skippable with :func:`frog_optax.apply_if_finite`), not
  give a finite update of an indefinite system.
  """
  value = jnp.asarray(value)
  return jnp.where(value >= 0, value, jnp.nan)


def scaled(learning_rate: optax.ScalarOrSchedule, ratio: Any):
  """`learning_rate * ratio`, keeping schedules schedules."""
  if callable(learning_rate):
    return lambda count: learning_rate(count) * ratio
  return learning_rate * ratio


def solve_dtype(direction: RowParams):
  """Solves run in at least float32 (float64 stays float64)."""
  return jnp.promote_types(direction['kernel'].dtype, jnp.float32)


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
    heavy_ball(momentum, nesterov, mu_dtype),
    scale_by,
    optax.add_decayed_weights(weight_decay, weight_decay_mask),
    optax.scale_by_learning_rate(learning_rate),
  )
  return routing.route(preconditioned, fallback, exclude)
