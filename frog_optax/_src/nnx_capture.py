"""The NNX side of the capture: the class-level `__call__` patch.

While `frog_optax.nnx.value_and_grad` runs, the captured layer classes'
`__call__` is replaced (and the saved originals restored afterwards). A
captured call keeps its sampled, gradient-stopped inputs and a zero
perturbation of its sampled outputs in NNX Variables on the layer, so that
lifted transforms (`nnx.scan`, `nnx.vmap`, `nnx.remat`) carry them.
"""

import contextlib
import functools
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from frog_optax._src import capture as capture_lib
from frog_optax._src import layer_kinds
from frog_optax._src import paths
from frog_optax._src import stats as stats_lib


class FrogInputs(nnx.Variable):
  """Capture-internal: the sampled inputs of one call of a layer."""


class FrogPerturbation(nnx.Variable):
  """Capture-internal: the zero perturbation of one call's sampled outputs.

  Its gradient is dLoss/d(outputs) for the sampled examples.
  """


# Both travel as NNX Variables on the layer, so that lifted transforms in the
# model (nnx.scan, nnx.vmap, nnx.remat) carry them in and out like any other
# state (stacked along a scanned or vmapped axis); only static facts go
# through the Python-side session. The layer's path is a static attribute,
# because lifted transforms call copies of the layer.
_PATH = '_frog_capture_path'
INPUTS_PREFIX = 'frog_inputs_'
PERTURBATION_PREFIX = 'frog_perturbation_'


sessions = capture_lib.SessionSlot()
_patch_lock = threading.Lock()
_patch_depth = 0


def _sample(module, inputs, y, examples, args, kwargs):
  """What one call of a captured layer contributes."""
  # An Einsum's equation may come at call time.
  einsum_str = args[0] if args else kwargs.get('einsum_str')
  return layer_kinds.sample(module, inputs, y, examples, einsum_str)


def _capturing_call(original: Callable[..., Any]) -> Callable[..., Any]:
  """`original` (a layer's `__call__`), plus capture inside a session."""

  @functools.wraps(original)
  def call(self, inputs, *args, **kwargs):
    session = sessions.current()
    path = None if session is None else getattr(self, _PATH, None)
    if path is None:  # outside value_and_grad, or not part of the model
      return original(self, inputs, *args, **kwargs)
    y = original(self, inputs, *args, **kwargs)
    # The calls already on this copy of the layer: a lifted transform may
    # trace its body more than once, each time on a fresh copy.
    index = sum(name.startswith(INPUTS_PREFIX) for name in vars(self))
    sampled = session.sample(
      path,
      type(self).__name__,
      inputs,
      index,
      lambda examples: _sample(self, inputs, y, examples, args, kwargs),
    )
    if sampled is None:  # not captured: the session says why
      return y
    setattr(self, f'{INPUTS_PREFIX}{index}', FrogInputs(sampled.inputs))
    name = f'{PERTURBATION_PREFIX}{index}'
    if session.discover:
      zeros = jnp.zeros(sampled.perturbation_shape, y.dtype)
      setattr(self, name, FrogPerturbation(zeros))
      return y
    return sampled.add_perturbation(getattr(self, name)[...])

  return call


_saved_calls: dict[type, Callable[..., Any]] = {}


@contextlib.contextmanager
def capturing_layers():
  """Replaces the layers' `__call__` while any thread is capturing.

  The originals are saved and put back when the last capture ends, whatever
  other wrappers did to the class attribute in between.
  """
  global _patch_depth
  with _patch_lock:
    if _patch_depth == 0:
      for cls in layer_kinds.NNX_TYPES:
        _saved_calls[cls] = cls.__dict__['__call__']
        cls.__call__ = _capturing_call(_saved_calls[cls])
    _patch_depth += 1
  try:
    yield
  finally:
    with _patch_lock:
      _patch_depth -= 1
      if _patch_depth == 0:
        for cls in layer_kinds.NNX_TYPES:
          cls.__call__ = _saved_calls.pop(cls)


def _captured_modules(model: nnx.Module) -> dict[str, nnx.Module]:
  return {
    paths.path_name(path): module
    for path, module in nnx.iter_modules(model)
    if isinstance(module, layer_kinds.NNX_TYPES)
  }


@contextlib.contextmanager
def tagged(model: nnx.Module):
  """Marks the model's layers with their paths; removes every trace after."""
  modules = _captured_modules(model)
  for path, module in modules.items():
    setattr(module, _PATH, path)
  try:
    yield
  finally:
    for module in modules.values():
      for name in list(vars(module)):
        if name == _PATH or name.startswith(
          (INPUTS_PREFIX, PERTURBATION_PREFIX)
        ):
          delattr(module, name)


def calls(state: nnx.State, prefix: str) -> dict[str, list[jax.Array]]:
  """`{module path: [value of call 0, call 1, ...]}` from capture Variables."""
  by_call: dict[str, dict[int, jax.Array]] = {}
  for path, value in nnx.to_flat_state(state):
    name = paths.key_name(path[-1])
    module = paths.path_name(path[:-1])
    value = value[...] if isinstance(value, nnx.Variable) else value
    by_call.setdefault(module, {})[int(name[len(prefix) :])] = value
  return {m: [calls[i] for i in sorted(calls)] for m, calls in by_call.items()}


def uncaptured_modules(
  model: nnx.Module,
) -> dict[str, stats_lib.UncapturedLayer]:
  """The modules with a kernel of a type the capture does not know."""
  return {
    paths.path_name(path): stats_lib.UncapturedLayer(
      type(module).__name__, stats_lib.UNKNOWN_TYPE
    )
    for path, module in nnx.iter_modules(model)
    if not isinstance(module, layer_kinds.NNX_TYPES)
    and isinstance(getattr(module, 'kernel', None), nnx.Param)
  }
