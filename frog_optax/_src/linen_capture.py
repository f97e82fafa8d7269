"""The linen side of the capture: the method interceptor and `capture`.

A method interceptor on the captured layer types `sow`s the sampled examples'
(gradient-stopped) inputs into the `frog_inputs` collection and adds a zero
perturbation variable (`frog_perturbations`) to their outputs, whose
gradient is dLoss/d(outputs). `frog_optax.linen.value_and_grad` drives it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from frog_optax._src import capture as capture_lib
from frog_optax._src import layer_kinds
from frog_optax._src import layer_maps
from frog_optax._src import paths
from frog_optax._src import stats as stats_lib

INPUTS = 'frog_inputs'
PERTURBATIONS = 'frog_perturbations'
_SOW_NAME = 'inputs'
LIFTED = (
  'the capture collections did not reach it, probably inside nn.scan or'
  ' nn.vmap: give both a leading layer axis there, variable_axes={"params":'
  ' 0, fo.linen.INPUTS: 0, fo.linen.PERTURBATIONS: 0}'
)


@dataclasses.dataclass
class Session(capture_lib.Recorder):
  """One pass of `value_and_grad`: the shared record, plus linen's own."""

  perturbations: list[Any] = dataclasses.field(default_factory=list)
  collected_inputs: list[Any] = dataclasses.field(default_factory=list)
  collected_perturbations: list[Any] = dataclasses.field(default_factory=list)
  num_applies: int = 0


sessions = capture_lib.SessionSlot()


# ----------------------------------------------------------------------------
# The interceptor.


def _is_captured(module: nn.Module) -> bool:
  # Only the stock __call__: a subclass that overrides it may not be the
  # linear map we model.
  return any(
    isinstance(module, t) and type(module).__call__ is t.__call__
    for t in layer_kinds.LINEN_TYPES
  )


def _sample(module, args, kwargs, x, y, examples) -> layer_maps.Sampled:
  # An Einsum's equation may come at call time, after the inputs.
  einsum_str = args[1] if len(args) > 1 else kwargs.get('einsum_str')
  return layer_kinds.sample(module, x, y, examples, einsum_str)


def _note_uncaptured(session: Session, module: nn.Module) -> None:
  """Remembers a called module with a kernel of a type not captured."""
  if module.scope is not None and module.has_variable('params', 'kernel'):
    path = '/'.join(module.scope.path)
    session.refuse(path, type(module).__name__, stats_lib.UNKNOWN_TYPE)


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  session = sessions.current()
  if session is None or context.method_name != '__call__':
    return next_fun(*args, **kwargs)
  if not _is_captured(module):
    _note_uncaptured(session, module)
    return next_fun(*args, **kwargs)
  x = args[0] if args else kwargs['inputs']
  y = next_fun(*args, **kwargs)
  path = '/'.join(module.scope.path)
  layer_type = type(module).__name__
  index = 0
  if module.has_variable(INPUTS, _SOW_NAME):
    index = len(module.get_variable(INPUTS, _SOW_NAME))
  sampled = session.sample(
    path,
    layer_type,
    x,
    (session.num_applies, index),
    lambda examples: _sample(module, args, kwargs, x, y, examples),
  )
  if sampled is None:  # not captured: the session says why
    return y
  try:
    perturbation = module.variable(
      PERTURBATIONS,
      f'output_grads_{index}',
      jnp.zeros,
      sampled.perturbation_shape,
      y.dtype,
    )
  except flax.errors.ScopeCollectionNotFound:
    session.refuse(path, layer_type, LIFTED)
    return y
  module.sow(INPUTS, _SOW_NAME, sampled.inputs)
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
    session = sessions.current()
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


def assemble_stats(session: Session, output_grads: list[Any], axis_name):
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


def discovered_perturbations(session: Session) -> list[Any]:
  """The zero perturbations a discovery pass created, by `apply` call.

  Layers whose capture collections a lifted transform lost have none: they
  are refused here.
  """
  seen = set()
  for tree in session.collected_perturbations:
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
      seen.add(paths.path_name(path[:-1]))
  for path in sorted(set(session.kinds) - seen):
    session.refuse(path, session.layer_types[path], LIFTED)
  return session.collected_perturbations
