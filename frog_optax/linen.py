"""Flax linen capture: one backward pass gives loss, grads and FROG stats.

The user wraps `model.apply` once with :func:`capture` and replaces
`jax.value_and_grad` by :func:`value_and_grad`. Inside, a method interceptor
on `nn.Dense`/`nn.Conv` does two things for the sampled rows of the batch:
it `sow`s their (gradient-stopped) inputs, and it adds a zero "perturbation"
variable to their outputs. The gradient of the loss with respect to those
zeros is dLoss/d(outputs), computed by the same backward pass as the
parameter gradients — no second pass, no loss registration, any loss works.

Everything traced travels through Flax collections (`frog_inputs`,
`frog_perturbations`), so `nn.remat` and friends cannot leak tracers; only
static layer geometry goes through the Python-side session.
"""

import contextlib
import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax import lax

from frog_optax._src import describe as describe_lib
from frog_optax._src import stats as stats_lib
from frog_optax._src import validation

INPUTS = 'frog_inputs'
PERTURBATIONS = 'frog_perturbations'
_SOW_NAME = 'inputs'
_CAPTURED_TYPES = (nn.Dense, nn.Conv)
_LIFTED_HINT = (
  ' It was probably called inside nn.scan or nn.vmap, whose stacked layers'
  ' FROG does not capture yet; exclude it with frog(..., exclude=...).'
)


@dataclasses.dataclass
class _Session:
  """One `value_and_grad` call: how to sample, and what was seen."""

  discover: bool
  sample_size: int | None
  rng: jax.Array | None
  perturbations: list[Any] = dataclasses.field(default_factory=list)
  collected_inputs: list[Any] = dataclasses.field(default_factory=list)
  collected_perturbations: list[Any] = dataclasses.field(default_factory=list)
  geometry: dict[str, stats_lib.LayerGeometry] = dataclasses.field(
    default_factory=dict
  )
  # Batch size of every call of every layer, in call order.
  batch_sizes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
  num_applies: int = 0


_local = threading.local()


def _current_session() -> _Session | None:
  return getattr(_local, 'session', None)


@contextlib.contextmanager
def _session_scope(session: _Session):
  previous = _current_session()
  _local.session = session
  try:
    yield session
  finally:
    _local.session = previous


# ----------------------------------------------------------------------------
# Layer geometry: how each supported layer maps to a lax-level linear map.


def _tuple(value, n):
  if value is None:
    return (1,) * n
  if isinstance(value, int):
    return (value,) * n
  return tuple(value)


def _unsupported(module: nn.Module, why: str) -> NotImplementedError:
  path = '/'.join(module.scope.path) if module.scope else '?'
  return NotImplementedError(
    f'frog_optax cannot capture {type(module).__name__} at {path!r}: {why}.'
    f" Exclude it with frog(..., exclude=('{path}',))."
  )


def _check_supported(module: nn.Module) -> None:
  if isinstance(module, nn.Dense):
    if module.dot_general is not None or module.dot_general_cls is not None:
      raise _unsupported(module, 'a custom dot_general is set')
  else:
    if module.conv_general_dilated_cls is not None or (
      module.conv_general_dilated not in (None, lax.conv_general_dilated)
    ):
      raise _unsupported(module, 'a custom conv_general_dilated is set')
    if module.mask is not None:
      raise _unsupported(module, 'masked kernels are not supported')


def _is_captured(module: nn.Module) -> bool:
  # Only the stock __call__: a subclass that overrides it may not be the
  # linear map we model.
  return any(
    isinstance(module, t) and type(module).__call__ is t.__call__
    for t in _CAPTURED_TYPES
  )


def _conv_lax_inputs(module: nn.Conv, x: jax.Array):
  """The inputs and geometry of the lax conv that Flax's `Conv` runs."""
  kernel_size = _tuple(module.kernel_size, 1)
  n = len(kernel_size)
  strides = _tuple(module.strides, n)
  input_dilation = _tuple(module.input_dilation, n)
  kernel_dilation = _tuple(module.kernel_dilation, n)
  dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
  padding = module.padding
  if isinstance(padding, str):
    padding = padding.upper()
  if padding in ('CIRCULAR', 'REFLECT'):
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
    mode = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[padding]
    x = jnp.pad(x, pads, mode=mode)
    padding = 'VALID'
  elif padding == 'CAUSAL':
    if n != 1:
      raise _unsupported(module, 'CAUSAL padding is 1-D only')
    x = jnp.pad(
      x, [(0, 0), ((kernel_size[0] - 1) * kernel_dilation[0], 0), (0, 0)]
    )
    padding = 'VALID'
  if isinstance(padding, str):
    if padding not in ('SAME', 'VALID', 'SAME_LOWER'):
      raise _unsupported(module, f'padding {padding!r} is unknown')
    # lax.conv_general_dilated computes string padding on the undilated
    # input shape; do the same.
    pads = lax.padtype_to_pads(x.shape[1:-1], dilated, strides, padding)
  elif isinstance(padding, int):
    pads = [(padding, padding)] * n
  else:
    pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    if len(pads) == 1 and n > 1:
      pads = pads * n
  geometry = stats_lib.ConvGeometry(
    strides=strides,
    padding=tuple((int(lo), int(hi)) for lo, hi in pads),
    input_dilation=input_dilation,
    kernel_dilation=kernel_dilation,
    feature_group_count=int(module.feature_group_count),
  )
  return x, geometry


def _sample_rows(batch: int, session: _Session) -> jax.Array | slice:
  s = session.sample_size
  s = batch if s is None or s >= batch else s
  if session.rng is None:
    # Strided rows stay local to each shard when the batch axis is sharded.
    step = batch // s
    return slice(0, step * s, step)
  return jnp.sort(jax.random.choice(session.rng, batch, (s,), replace=False))


# Strided rows are taken by a reshape to (s, stride, ...) and a slice of the
# second axis, not by a gather: with the batch axis sharded over devices, the
# s axis inherits the sharding, so neither the sampled inputs nor the output
# gradients of the sample leave their device (a gather or scatter with row
# indices made XLA all-reduce the sampled output gradients).


def _strided(a: jax.Array, rows: slice) -> jax.Array:
  """`a[:s·stride]` as `(s, stride, ...)`."""
  step = rows.step
  s = (rows.stop - rows.start) // step
  return a[: s * step].reshape((s, step) + a.shape[1:])


def _take_rows(a: jax.Array, rows: jax.Array | slice) -> jax.Array:
  if isinstance(rows, slice):
    return _strided(a, rows)[:, 0]
  return a[rows]


def _add_to_rows(
  a: jax.Array, rows: jax.Array | slice, values: jax.Array
) -> jax.Array:
  """`a.at[rows].add(values)`, sharding-friendly for strided rows."""
  if not isinstance(rows, slice):
    return a.at[rows].add(values)
  # Zeros between the sampled rows: (s, 1, ...) → (s, stride, ...) → rows.
  pad = [(0, 0), (0, rows.step - 1)] + [(0, 0)] * (values.ndim - 1)
  spread = jnp.pad(values[:, None], pad).reshape((-1,) + a.shape[1:])
  tail = a.shape[0] - spread.shape[0]  # rows after the last whole stride
  if tail:
    spread = jnp.pad(spread, [(0, tail)] + [(0, 0)] * (a.ndim - 1))
  return a + spread


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  session = _current_session()
  if (
    session is None
    or context.method_name != '__call__'
    or not _is_captured(module)
  ):
    return next_fun(*args, **kwargs)
  _check_supported(module)
  x = args[0] if args else kwargs['inputs']
  y = next_fun(*args, **kwargs)
  path = '/'.join(module.scope.path)
  is_conv = isinstance(module, nn.Conv)
  num_feature_dims = len(_tuple(module.kernel_size, 1)) + 1 if is_conv else 1
  if x.ndim <= num_feature_dims:
    raise _unsupported(
      module, f'inputs of shape {x.shape} have no batch axis to sample from'
    )
  rows = _sample_rows(x.shape[0], session)
  x_rows = lax.stop_gradient(_take_rows(x, rows))
  # Fold extra leading axes into the sample axis: they are samples too.
  x_rows = x_rows.reshape((-1,) + x.shape[x.ndim - num_feature_dims :])
  if is_conv:
    x_rows, geometry = _conv_lax_inputs(module, x_rows)
  else:
    geometry = stats_lib.DenseGeometry()
  if session.geometry.setdefault(path, geometry) != geometry:
    raise _unsupported(module, 'its calls have different geometries')
  session.batch_sizes.setdefault(path, []).append(x.shape[0])

  index = 0
  if module.has_variable(INPUTS, _SOW_NAME):
    index = len(module.get_variable(INPUTS, _SOW_NAME))
  module.sow(INPUTS, _SOW_NAME, x_rows)
  y_rows_shape = jax.eval_shape(lambda t: _take_rows(t, rows), y).shape
  try:
    perturbation = module.variable(
      PERTURBATIONS,
      f'output_grads_{index}',
      jnp.zeros,
      y_rows_shape,
      y.dtype,
    )
  except flax.errors.ScopeCollectionNotFound as e:
    raise NotImplementedError(
      f'frog_optax could not capture {path!r}.' + _LIFTED_HINT
    ) from e
  return _add_to_rows(y, rows, perturbation.value)


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
    session = _current_session()
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


def _assemble_stats(session: _Session, output_grads: list[Any]):
  """`{module_path: LayerStats}` from all apply calls and call sites."""
  flat_inputs: dict[str, list[jax.Array]] = {}
  flat_grads: dict[str, list[jax.Array]] = {}
  for inputs_tree, grads_tree in zip(session.collected_inputs, output_grads):
    for path, leaf in jax.tree_util.tree_flatten_with_path(inputs_tree)[0]:
      # path = (*module, 'inputs', call_index)
      module = stats_lib.path_name(path[:-2])
      flat_inputs.setdefault(module, []).append(leaf)
    # Leaves are named output_grads_<call index>; order them by that index.
    by_call = sorted(
      jax.tree_util.tree_flatten_with_path(grads_tree)[0],
      key=lambda item: int(stats_lib.key_name(item[0][-1]).rsplit('_', 1)[1]),
    )
    for path, leaf in by_call:
      module = stats_lib.path_name(path[:-1])
      flat_grads.setdefault(module, []).append(leaf)
  captured = {}
  for module, xs in flat_inputs.items():
    dys = flat_grads[module]
    if len({x.shape[1:] for x in xs}) > 1:
      raise NotImplementedError(
        f'{module!r} was called on inputs of different shapes'
        f' {[x.shape for x in xs]}; FROG stats cannot be combined. Exclude it.'
      )
    geometry = session.geometry[module]
    expected_ndim = (
      2
      if isinstance(geometry, stats_lib.DenseGeometry)
      else geometry.num_spatial_dims + 2
    )
    if xs[0].ndim != expected_ndim:
      raise NotImplementedError(
        f'frog_optax could not capture {module!r}: its inputs have an extra'
        f' stacked axis (shape {xs[0].shape}).' + _LIFTED_HINT
      )
    x = jnp.concatenate(xs) if len(xs) > 1 else xs[0]
    # A mean-reduced loss scales dy by 1/B: undo it per call (the solve is
    # scale-free), so that small dy² do not underflow.
    dy = [
      d.reshape((-1,) + d.shape[-(x.ndim - 1) :]) * b
      for d, b in zip(dys, session.batch_sizes[module])
    ]
    dy = jnp.concatenate(dy) if len(dy) > 1 else dy[0]
    captured[module] = stats_lib.LayerStats(
      inputs=x, output_grads=dy, geometry=geometry
    )
  return captured


def _check_all_perturbed(session: _Session, perturbation_shapes) -> None:
  """Layers whose capture collections were dropped by a lifted transform."""
  seen = set()
  for tree in perturbation_shapes:
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
      seen.add(stats_lib.path_name(path[:-1]))
  lost = sorted(set(session.geometry) - seen)
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
    params = args[argnums]

    def run(session, perturbations, params):
      call_args = list(args)
      call_args[argnums] = params
      session.perturbations = perturbations
      with _session_scope(session):
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
    stats = stats_lib.stats_tree(params, _assemble_stats(session, output_grads))
    value = (loss, aux) if has_aux else loss
    return value, grads, stats

  return wrapped


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


def describe(params: Any, stats: Any, exclude=()) -> str:
  """A table of which parameters FROG preconditions and which fall back.

  See :func:`frog_optax.describe`.
  """
  return describe_lib.describe(params, stats, exclude)


__all__ = [
  'INPUTS',
  'PERTURBATIONS',
  'TrainState',
  'capture',
  'describe',
  'value_and_grad',
]
