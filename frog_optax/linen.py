"""Flax linen capture: one backward pass gives loss, grads and FROG stats.

The user wraps `model.apply` once with :func:`capture` and replaces
`jax.value_and_grad` by :func:`value_and_grad`. Inside, a method interceptor
on `nn.Dense`, `nn.Conv`, `nn.DenseGeneral` and `nn.Einsum` (so also the
projections of `nn.MultiHeadDotProductAttention`) does two things for the
sampled rows of the batch:
it `sow`s their (gradient-stopped) inputs, and it adds a zero "perturbation"
variable to their outputs. The gradient of the loss with respect to those
zeros is dLoss/d(outputs), computed by the same backward pass as the
parameter gradients — no second pass, no loss registration, any loss works.

Everything traced travels through Flax collections (`frog_inputs`,
`frog_perturbations`), so `nn.remat` and friends cannot leak tracers; only
static layer geometry goes through the Python-side session. Under `nn.scan`,
give both collections the parameters' layer axis (`variable_axes={'params':
0, INPUTS: 0, PERTURBATIONS: 0}`): the stats then carry it too, and every
layer of the stack is preconditioned on its own. `nn.Embed` has no kernel
and goes to the fallback.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax import lax

from frog_optax._src import capture as capture_lib
from frog_optax._src import describe as describe_lib
from frog_optax._src import layer_maps
from frog_optax._src import layouts as layouts_lib
from frog_optax._src import paths
from frog_optax._src import stats as stats_lib
from frog_optax._src import validation

INPUTS = 'frog_inputs'
PERTURBATIONS = 'frog_perturbations'
_SOW_NAME = 'inputs'
_CAPTURED_TYPES = (nn.Dense, nn.Conv, nn.DenseGeneral, nn.Einsum)
_LIFTED_HINT = (
  ' It was probably called inside nn.scan or nn.vmap: give both capture'
  ' collections a leading layer axis there, variable_axes={"params": 0,'
  ' fo.linen.INPUTS: 0, fo.linen.PERTURBATIONS: 0}, or exclude it with'
  ' frog(..., exclude=...).'
)


@dataclasses.dataclass
class _Session(capture_lib.Recorder):
  """One pass of `value_and_grad`: the shared record, plus linen's own."""

  perturbations: list[Any] = dataclasses.field(default_factory=list)
  collected_inputs: list[Any] = dataclasses.field(default_factory=list)
  collected_perturbations: list[Any] = dataclasses.field(default_factory=list)
  # Type names of the called modules with a kernel that cannot be captured.
  uncaptured: dict[str, str] = dataclasses.field(default_factory=dict)
  num_applies: int = 0


_sessions = capture_lib.SessionSlot()


# ----------------------------------------------------------------------------
# The interceptor.


def _unsupported(module: nn.Module, why: str) -> Exception:
  path = '/'.join(module.scope.path) if module.scope else '?'
  return capture_lib.unsupported_error(type(module).__name__, path, why)


def _check_supported(module: nn.Module) -> None:
  why = None
  if isinstance(module, (nn.Dense, nn.DenseGeneral)):
    if module.dot_general is not None or module.dot_general_cls is not None:
      why = capture_lib.CUSTOM_DOT_GENERAL
    elif isinstance(module, nn.DenseGeneral) and module.batch_dims:
      why = capture_lib.BATCHED_KERNEL
  elif isinstance(module, nn.Conv):
    if module.conv_general_dilated_cls is not None or (
      module.conv_general_dilated not in (None, lax.conv_general_dilated)
    ):
      why = capture_lib.CUSTOM_CONV
    elif module.mask is not None:
      why = capture_lib.MASKED
  if why:
    raise _unsupported(module, why)


def _is_captured(module: nn.Module) -> bool:
  # Only the stock __call__: a subclass that overrides it may not be the
  # linear map we model.
  return any(
    isinstance(module, t) and type(module).__call__ is t.__call__
    for t in _CAPTURED_TYPES
  )


def _sample(module, args, kwargs, x, y, rows) -> layer_maps.Sampled:
  unsupported = lambda why: _unsupported(module, why)
  if isinstance(module, nn.Conv):
    return layer_maps.sample_conv(module, x, y, rows, unsupported)
  if isinstance(module, nn.Dense):
    dense = layer_maps.dense_map(x.ndim, unsupported)
  elif isinstance(module, nn.DenseGeneral):
    dense = layer_maps.dense_general_map(
      x.ndim,
      layer_maps.as_tuple(module.axis, 1),
      len(layer_maps.as_tuple(module.features, 1)),
      unsupported,
    )
  else:  # nn.Einsum: the equation may also be given at call time.
    einsum_str = args[1] if len(args) > 1 else kwargs.get('einsum_str')
    einsum_str = (einsum_str or module.einsum_str).replace(' ', '')
    dense = layer_maps.einsum_map(
      einsum_str, x.shape, tuple(module.shape), unsupported
    )
  return layer_maps.sample_dense(x, y, rows, dense)


def _note_uncaptured(session: _Session, module: nn.Module) -> None:
  """Remembers a called module with a kernel that is not captured."""
  if module.scope is not None and module.has_variable('params', 'kernel'):
    path = '/'.join(module.scope.path)
    session.uncaptured.setdefault(path, type(module).__name__)


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  session = _sessions.current()
  if session is None or context.method_name != '__call__':
    return next_fun(*args, **kwargs)
  if not _is_captured(module):
    _note_uncaptured(session, module)
    return next_fun(*args, **kwargs)
  _check_supported(module)
  x = args[0] if args else kwargs['inputs']
  y = next_fun(*args, **kwargs)
  path = '/'.join(module.scope.path)
  index = 0
  if module.has_variable(INPUTS, _SOW_NAME):
    index = len(module.get_variable(INPUTS, _SOW_NAME))
  sampled = session.sample(
    path,
    type(module).__name__,
    x,
    (session.num_applies, index),
    lambda rows: _sample(module, args, kwargs, x, y, rows),
  )
  module.sow(INPUTS, _SOW_NAME, sampled.inputs)
  try:
    perturbation = module.variable(
      PERTURBATIONS,
      f'output_grads_{index}',
      jnp.zeros,
      sampled.perturbation_shape,
      y.dtype,
    )
  except flax.errors.ScopeCollectionNotFound as e:
    raise NotImplementedError(
      f'frog_optax could not capture {path!r}.' + _LIFTED_HINT
    ) from e
  return sampled.add_perturbation(perturbation.value)


# ----------------------------------------------------------------------------
# Public API.


def _with_capture_collections(user_mutable, discover: bool):
  ours = [INPUTS, PERTURBATIONS] if discover else [INPUTS]
  if user_mutable is True:
    return True
  if user_mutable is False or user_mutable is None:
    return ours
  if isinstance(user_mutable, (list, tuple)):
    return list(user_mutable) + ours
  return [user_mutable] + ours


def capture(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps a linen `apply` so that :func:`value_and_grad` can capture stats.

  Outside :func:`value_and_grad` the wrapped function is exactly `apply_fn`
  (no extra work: use it for evaluation too). Inside, it returns exactly what
  `apply_fn` returns (the capture collections are removed).

  Args:
    apply_fn: `model.apply` of a linen module (or any function with its
      signature).

  Returns:
    A function with the signature of `apply_fn`.

  Example:
    >>> import flax.linen as nn, frog_optax as fo
    >>> model = nn.Dense(3)
    >>> apply_fn = fo.linen.capture(model.apply)
  """

  def captured_apply(variables, *args, **kwargs):
    session = _sessions.current()
    if session is None:
      return apply_fn(variables, *args, **kwargs)
    user_mutable = kwargs.pop('mutable', False)
    mutable = _with_capture_collections(user_mutable, session.discover)
    variables = dict(variables)
    for name in (INPUTS, PERTURBATIONS):
      if name in variables:
        raise ValueError(f'variables must not contain the {name!r} collection.')
    if not session.discover:
      variables[PERTURBATIONS] = session.perturbations[session.num_applies]
    session.num_applies += 1
    with nn.intercept_methods(_interceptor):
      outputs, state = apply_fn(variables, *args, mutable=mutable, **kwargs)
    state = dict(state)
    session.collected_inputs.append(state.pop(INPUTS, {}))
    session.collected_perturbations.append(state.pop(PERTURBATIONS, {}))
    if user_mutable is False or user_mutable is None:
      return outputs
    return outputs, state

  return captured_apply


def _assemble_stats(session: _Session, output_grads: list[Any], axis_name):
  """`{module_path: LayerStats}` from all apply calls and call sites."""
  flat_inputs: dict[str, list[jax.Array]] = {}
  flat_grads: dict[str, list[jax.Array]] = {}
  for inputs_tree, grads_tree in zip(session.collected_inputs, output_grads):
    for path, leaf in jax.tree_util.tree_flatten_with_path(inputs_tree)[0]:
      # path = (*module, 'inputs', call_index)
      module = paths.path_name(path[:-2])
      flat_inputs.setdefault(module, []).append(leaf)
    # Leaves are named output_grads_<call index>; order them by that index.
    by_call = sorted(
      jax.tree_util.tree_flatten_with_path(grads_tree)[0],
      key=lambda item: int(paths.key_name(item[0][-1]).rsplit('_', 1)[1]),
    )
    for path, leaf in by_call:
      module = paths.path_name(path[:-1])
      flat_grads.setdefault(module, []).append(leaf)
  return session.layer_stats(flat_inputs, flat_grads, axis_name)


def _check_all_perturbed(session: _Session, perturbation_shapes) -> None:
  """Layers whose capture collections were dropped by a lifted transform."""
  seen = set()
  for tree in perturbation_shapes:
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
      seen.add(paths.path_name(path[:-1]))
  lost = sorted(set(session.kinds) - seen)
  if lost:
    raise NotImplementedError(
      f'frog_optax could not capture {lost}: the capture collections did'
      ' not come back from the apply.' + _LIFTED_HINT
    )


def value_and_grad(
  fun: Callable[..., Any],
  argnums: int = 0,
  *,
  sample_size: int | None,
  has_aux: bool = False,
  rng: jax.Array | None = None,
  axis_name: Any = None,
) -> Callable[..., tuple[Any, Any, Any]]:
  """Like `jax.value_and_grad`, plus the FROG stats of captured layers.

  `fun` must call a function wrapped by :func:`capture`. One forward and one
  backward pass compute the value, the gradients (identical to
  `jax.value_and_grad`) and, for the sampled examples of each captured
  `nn.Dense`/`nn.Conv`, its inputs and output gradients.

  Args:
    fun: the loss function.
    argnums: index of the parameter argument (a single int).
    sample_size: examples per batch used for the Fisher (s); `None`, or a
      value >= the batch size, uses the whole batch.
    has_aux: whether `fun` returns `(loss, aux)`.
    rng: optional PRNG key: sample `sample_size` random rows (the same rows
      for every layer) instead of the default strided rows `x[::B // s]`.
      Strided rows stay on their device when the batch axis is sharded
      (let `sample_size` divide the batch and the device count divide
      `sample_size`); random rows are gathered across devices.
    axis_name: under `jax.pmap` or `jax.shard_map` with per-replica
      batches, the name of the data-parallel axis: the sampled inputs and
      output gradients of all replicas are gathered along it
      (`lax.all_gather`), so every replica holds the same stats and, with
      gradients averaged by `lax.pmean`, computes the same update. Each
      replica samples `sample_size` of its own examples. Without it, inside
      a named axis, a warning says so. Not needed under `jax.jit` with
      sharded arrays (the stats are global there).

  Returns:
    A function returning `(value, grads, stats)`; `value` is `loss` or
    `(loss, aux)`, `stats` is a params-prefix tree with a
    :class:`frog_optax.LayerStats` per captured module and `None` elsewhere.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, frog_optax as fo
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((8, 4))
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> apply_fn = fo.linen.capture(model.apply)
    >>> loss_fn = lambda p, x: apply_fn({'params': p}, x).sum()
    >>> loss, grads, stats = fo.linen.value_and_grad(
    ...     loss_fn, sample_size=4)(params, x)
    >>> stats.inputs.shape
    (4, 4)
  """
  if sample_size is not None:
    validation.check_positive_int('sample_size', sample_size)
  if not isinstance(argnums, int):
    raise ValueError(f'argnums must be a single int; got {argnums!r}.')

  def wrapped(*args, **kwargs):
    capture_lib.check_axis_name(axis_name)
    params = args[argnums]

    def run(session, perturbations, params):
      call_args = list(args)
      call_args[argnums] = params
      session.perturbations = perturbations
      with _sessions.scope(session):
        out = fun(*call_args, **kwargs)
      loss, aux = out if has_aux else (out, None)
      return loss, (aux, session.collected_inputs)

    discovery = _Session(True, sample_size, rng)
    shapes = jax.eval_shape(
      lambda p: (run(discovery, [], p), discovery.collected_perturbations),
      params,
    )[1]
    _check_all_perturbed(discovery, shapes)
    zeros = [
      jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
      for tree in shapes
    ]
    session = _Session(False, sample_size, rng)
    (loss, (aux, _)), (grads, output_grads) = jax.value_and_grad(
      lambda p, z: run(session, z, p), argnums=(0, 1), has_aux=True
    )(params, zeros)
    stats = stats_lib.stats_tree(
      params,
      _assemble_stats(session, output_grads, axis_name),
      session.uncaptured,
    )
    value = (loss, aux) if has_aux else loss
    return value, grads, stats

  return wrapped


def layouts(
  fun: Callable[..., Any],
  *args: Any,
  argnums: int = 0,
  has_aux: bool = False,
  **kwargs: Any,
) -> Any:
  """Which kernel axes are rows, for every captured layer: shapes only.

  Runs :func:`value_and_grad` on `fun(*args, **kwargs)` as
  `jax.eval_shape` (no computation) and returns the `layouts` argument the
  optimizers with per-layer state (`fo.kfrog`, `fo.foof`, `fo.adafisher`)
  need to build that state at `init` for `nn.DenseGeneral`, `nn.Einsum` and
  `nn.scan`-stacked layers.

  Args:
    fun: the loss function, as given to :func:`value_and_grad`.
    *args: its arguments (arrays or shapes), parameters at `argnums`.
    argnums: index of the parameter argument.
    has_aux: whether `fun` returns `(loss, aux)`.
    **kwargs: its keyword arguments.

  Returns:
    A params-prefix tree with a :class:`frog_optax.ParamLayout` per captured
    module and `None` elsewhere.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, frog_optax as fo
    >>> model = nn.DenseGeneral((2, 3), axis=(-2, -1))
    >>> x = jnp.ones((8, 4, 5))
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> apply_fn = fo.linen.capture(model.apply)
    >>> loss_fn = lambda p, x: apply_fn({'params': p}, x).sum()
    >>> tx = fo.foof(0.1, layouts=fo.linen.layouts(loss_fn, params, x))
    >>> state = tx.init(params)
  """
  stats = jax.eval_shape(
    lambda *a, **kw: value_and_grad(
      fun, argnums, sample_size=None, has_aux=has_aux
    )(*a, **kw)[2],
    *args,
    **kwargs,
  )
  return layouts_lib.layout_tree(stats)


class TrainState(train_state.TrainState):
  """`flax.training.train_state.TrainState` that forwards `frog_stats`.

  Linen's `apply_gradients` drops extra keyword arguments; this one passes
  them to `tx.update`.

  Example:
    >>> # state = state.apply_gradients(grads=grads, frog_stats=stats)
  """

  def apply_gradients(self, *, grads, **kwargs):
    update_kwargs = {
      k: kwargs.pop(k)
      for k in list(kwargs)
      if k not in self.__dataclass_fields__
    }
    updates, new_opt_state = self.tx.update(
      grads, self.opt_state, self.params, **update_kwargs
    )
    new_params = optax.apply_updates(self.params, updates)
    return self.replace(
      step=self.step + 1, params=new_params, opt_state=new_opt_state, **kwargs
    )


def describe(params: Any, stats: Any, exclude: Any = ()) -> str:
  """A table of which parameters FROG preconditions and which fall back.

  `exclude` is the optimizer whose routing to show (e.g. `fo.frog(...)`) or
  the `exclude` it was built with. See :func:`frog_optax.describe`.
  """
  return describe_lib.describe(params, stats, exclude)


__all__ = [
  'INPUTS',
  'PERTURBATIONS',
  'TrainState',
  'capture',
  'describe',
  'layouts',
  'value_and_grad',
]
