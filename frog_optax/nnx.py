"""Flax NNX capture: one backward pass gives loss, grads and FROG stats.

The NNX counterpart of :mod:`frog_optax.linen`. NNX has no method
interceptor, so while :func:`value_and_grad` runs the user's loss, the
`__call__` of `nnx.Linear`, `nnx.Conv`, `nnx.LinearGeneral` and `nnx.Einsum`
(so also the projections of `nnx.MultiHeadAttention`) is replaced at class
level (and restored afterwards). The replacement does what the linen
interceptor does: it keeps the (gradient-stopped) inputs of the sampled
rows and adds a zero perturbation to their outputs, whose gradient, from the
same backward pass as the parameter gradients, is dLoss/d(outputs).

Other threads are not affected: the replacement captures only inside this
thread's :func:`value_and_grad`. What a call captures is kept in NNX
Variables on the layer (:class:`FrogInputs`, :class:`FrogPerturbation`,
removed afterwards), so layers inside `nnx.scan`, `nnx.vmap` and
`nnx.remat` are captured too: their stats get the stacked layer axis, and
each layer of the stack is preconditioned on its own. (A scan whose
`nnx.StateAxes` lists Variable types must send these two to the layer axis,
e.g. with `...: 0`.) `nnx.Embed` has no kernel and goes to the fallback.

Example:
  >>> import jax.numpy as jnp, frog_optax as fo
  >>> from flax import nnx
  >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  >>> optimizer = nnx.Optimizer(model, fo.frog(0.1), wrt=nnx.Param)
  >>> loss_fn = lambda model, x: jnp.mean(model(x) ** 2)
  >>> loss, grads, stats = fo.nnx.value_and_grad(
  ...     loss_fn, sample_size=4)(model, jnp.ones((8, 4)))
  >>> _ = optimizer.update(model, grads, frog_stats=stats)
"""

import contextlib
import functools
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from frog_optax._src import capture as capture_lib
from frog_optax._src import describe as describe_lib
from frog_optax._src import layer_maps
from frog_optax._src import layouts as layouts_lib
from frog_optax._src import paths
from frog_optax._src import stats as stats_lib
from frog_optax._src import validation

_CAPTURED_TYPES = (nnx.Linear, nnx.Conv, nnx.LinearGeneral, nnx.Einsum)


class FrogInputs(nnx.Variable):
  """Capture-internal: the sampled inputs of one call of a layer."""


class FrogPerturbation(nnx.Variable):
  """Capture-internal: the zero perturbation of one call's sampled outputs.

  Its gradient is dLoss/d(outputs) for the sampled rows.
  """


# Both travel as NNX Variables on the layer, so that lifted transforms in the
# model (nnx.scan, nnx.vmap, nnx.remat) carry them in and out like any other
# state (stacked along a scanned or vmapped axis); only static facts go
# through the Python-side session. The layer's path is a static attribute,
# because lifted transforms call copies of the layer.
_PATH = '_frog_capture_path'
_INPUTS = 'frog_inputs_'
_PERTURBATION = 'frog_perturbation_'


_sessions = capture_lib.SessionSlot()
_patch_lock = threading.Lock()
_patch_depth = 0


def _unsupported(path: str, module: Any, why: str) -> Exception:
  return capture_lib.unsupported_error(type(module).__name__, path, why)


def _check_supported(path: str, module: Any) -> None:
  why = None
  if isinstance(module, (nnx.Linear, nnx.LinearGeneral)):
    custom = getattr(module, 'dot_general_cls', None) is not None
    if custom or module.dot_general not in (None, lax.dot_general):
      why = capture_lib.CUSTOM_DOT_GENERAL
    elif getattr(module, 'batch_axis', None):
      why = capture_lib.BATCHED_KERNEL
  elif isinstance(module, nnx.Einsum):
    if module.einsum_op is not jnp.einsum:
      why = capture_lib.CUSTOM_EINSUM
  elif module.conv_general_dilated is not lax.conv_general_dilated:
    why = capture_lib.CUSTOM_CONV
  elif module.mask is not None:
    why = capture_lib.MASKED
  if why:
    raise _unsupported(path, module, why)


def _sample(module, inputs, y, rows, args, kwargs, unsupported):
  """What one call of a captured layer contributes."""
  if isinstance(module, nnx.Conv):
    return layer_maps.sample_conv(module, inputs, y, rows, unsupported)
  if isinstance(module, nnx.LinearGeneral):
    dense = layer_maps.dense_general_map(
      inputs.ndim,
      layer_maps.as_tuple(module.axis, 1),
      len(module.out_features),
      unsupported,
    )
  elif isinstance(module, nnx.Einsum):  # the equation may come at call time
    einsum_str = args[0] if args else kwargs.get('einsum_str')
    dense = layer_maps.einsum_map(
      (einsum_str or module.einsum_str).replace(' ', ''),
      inputs.shape,
      tuple(module.kernel.shape),
      unsupported,
    )
  else:
    dense = layer_maps.dense_map(inputs.ndim, unsupported)
  return layer_maps.sample_dense(inputs, y, rows, dense)


def _capturing_call(original: Callable[..., Any]) -> Callable[..., Any]:
  """`original` (a layer's `__call__`), plus capture inside a session."""

  @functools.wraps(original)
  def call(self, inputs, *args, **kwargs):
    session = _sessions.current()
    path = None if session is None else getattr(self, _PATH, None)
    if path is None:  # outside value_and_grad, or not part of the model
      return original(self, inputs, *args, **kwargs)
    _check_supported(path, self)
    y = original(self, inputs, *args, **kwargs)
    unsupported = lambda why: _unsupported(path, self, why)
    # The calls already on this copy of the layer: a lifted transform may
    # trace its body more than once, each time on a fresh copy.
    index = sum(name.startswith(_INPUTS) for name in vars(self))
    sampled = session.sample(
      path,
      type(self).__name__,
      inputs,
      index,
      lambda rows: _sample(self, inputs, y, rows, args, kwargs, unsupported),
    )
    setattr(self, f'{_INPUTS}{index}', FrogInputs(sampled.inputs))
    name = f'{_PERTURBATION}{index}'
    if session.discover:
      zeros = jnp.zeros(sampled.perturbation_shape, y.dtype)
      setattr(self, name, FrogPerturbation(zeros))
      return y
    return sampled.add_perturbation(getattr(self, name)[...])

  return call


_saved_calls: dict[type, Callable[..., Any]] = {}


@contextlib.contextmanager
def _capturing_layers():
  """Replaces the layers' `__call__` while any thread is capturing.

  The originals are saved and put back when the last capture ends, whatever
  other wrappers did to the class attribute in between.
  """
  global _patch_depth
  with _patch_lock:
    if _patch_depth == 0:
      for cls in _CAPTURED_TYPES:
        _saved_calls[cls] = cls.__dict__['__call__']
        cls.__call__ = _capturing_call(_saved_calls[cls])
    _patch_depth += 1
  try:
    yield
  finally:
    with _patch_lock:
      _patch_depth -= 1
      if _patch_depth == 0:
        for cls in _CAPTURED_TYPES:
          cls.__call__ = _saved_calls.pop(cls)


def _captured_modules(model: nnx.Module) -> dict[str, nnx.Module]:
  return {
    paths.path_name(path): module
    for path, module in nnx.iter_modules(model)
    if isinstance(module, _CAPTURED_TYPES)
  }


@contextlib.contextmanager
def _tagged(model: nnx.Module):
  """Marks the model's layers with their paths; removes every trace after."""
  modules = _captured_modules(model)
  for path, module in modules.items():
    setattr(module, _PATH, path)
  try:
    yield
  finally:
    for module in modules.values():
      for name in list(vars(module)):
        if name == _PATH or name.startswith((_INPUTS, _PERTURBATION)):
          delattr(module, name)


def _calls(state: nnx.State, prefix: str) -> dict[str, list[jax.Array]]:
  """`{module path: [value of call 0, call 1, ...]}` from capture Variables."""
  by_call: dict[str, dict[int, jax.Array]] = {}
  for path, value in nnx.to_flat_state(state):
    name = paths.key_name(path[-1])
    module = paths.path_name(path[:-1])
    value = value[...] if isinstance(value, nnx.Variable) else value
    by_call.setdefault(module, {})[int(name[len(prefix) :])] = value
  return {m: [calls[i] for i in sorted(calls)] for m, calls in by_call.items()}


def _uncaptured_modules(model: nnx.Module) -> dict[str, str]:
  """`{path: type name}` of the modules with a kernel the capture skips."""
  return {
    paths.path_name(path): type(module).__name__
    for path, module in nnx.iter_modules(model)
    if not isinstance(module, _CAPTURED_TYPES)
    and isinstance(getattr(module, 'kernel', None), nnx.Param)
  }


def value_and_grad(
  fun: Callable[..., Any],
  *,
  sample_size: int | None,
  has_aux: bool = False,
  rng: jax.Array | None = None,
  axis_name: Any = None,
) -> Callable[..., tuple[Any, Any, Any]]:
  """Like `nnx.value_and_grad(fun)`, plus the FROG stats of captured layers.

  `fun(model, *args, **kwargs)` takes the model first. One forward and one
  backward pass compute the value, the gradients of the model's `nnx.Param`s
  (identical to `nnx.value_and_grad`, including the updates of other state
  such as `BatchNorm` statistics) and, for the sampled examples of each
  `nnx.Linear`, `nnx.Conv`, `nnx.LinearGeneral` and `nnx.Einsum`, their
  inputs and output gradients. Graph nodes among the arguments (an
  `nnx.Rngs` for dropout) are updated as `nnx.value_and_grad` updates them.

  Args:
    fun: the loss function; its first argument is the model.
    sample_size: examples per batch used for the Fisher (s); `None`, or a
      value >= the batch size, uses the whole batch.
    has_aux: whether `fun` returns `(loss, aux)`.
    rng: optional PRNG key: `sample_size` random rows instead of the default
      strided rows `x[::B // s]`.
    axis_name: the data-parallel axis under `jax.pmap` or `jax.shard_map`:
      the samples of all replicas are gathered along it, so that every
      replica computes the same update (see
      :func:`frog_optax.linen.value_and_grad`).

  Returns:
    A function of `(model, *args, **kwargs)` returning `(value, grads,
    stats)`: `value` is `loss` or `(loss, aux)`, `grads` the `nnx.State` of
    parameter gradients, `stats` a tree of nested dicts (the module paths of
    the model) with a :class:`frog_optax.LayerStats` per captured layer and
    `None` at other parameters. Pass it as `frog_stats` to
    `nnx.Optimizer.update(model, grads, frog_stats=stats)`.

  Example:
    >>> import jax.numpy as jnp, frog_optax as fo
    >>> from flax import nnx
    >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> loss_fn = lambda model, x: model(x).sum()
    >>> loss, grads, stats = fo.nnx.value_and_grad(
    ...     loss_fn, sample_size=2)(model, jnp.ones((8, 4)))
    >>> stats.output_grads.shape
    (2, 3)
  """
  if sample_size is not None:
    validation.check_positive_int('sample_size', sample_size)

  def wrapped(model, *args, **kwargs):
    capture_lib.check_axis_name(axis_name)

    def run(session, model, *args, **kwargs):
      with _sessions.scope(session), _capturing_layers():
        out = fun(model, *args, **kwargs)
      return out if has_aux else (out, None)

    with _tagged(model):
      # Shapes only, on copies: neither the model nor graph nodes among the
      # arguments (an `nnx.Rngs` for dropout) are touched.
      discovery = capture_lib.Recorder(True, sample_size, rng)

      def discover(m, *a, **kw):
        run(discovery, m, *a, **kw)
        return nnx.state(m, FrogPerturbation)

      shapes = nnx.eval_shape(discover, model, *args, **kwargs)
      nnx.update(
        model, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      )
      # The arguments go through nnx.value_and_grad (not a closure), so that
      # their graph nodes are updated as nnx.value_and_grad updates them.
      session = capture_lib.Recorder(False, sample_size, rng)
      wrt = nnx.DiffState(0, nnx.Any(nnx.Param, FrogPerturbation))
      (loss, aux), all_grads = nnx.value_and_grad(
        lambda m, *a, **kw: run(session, m, *a, **kw),
        argnums=wrt,
        has_aux=True,
      )(model, *args, **kwargs)
      inputs = _calls(nnx.state(model, FrogInputs), _INPUTS)
    perturbation_grads, grads = nnx.split_state(
      all_grads, FrogPerturbation, ...
    )
    output_grads = _calls(perturbation_grads, _PERTURBATION)
    captured = session.layer_stats(inputs, output_grads, axis_name)
    params = nnx.to_pure_dict(grads)
    stats = stats_lib.stats_tree(params, captured, _uncaptured_modules(model))
    value = (loss, aux) if has_aux else loss
    return value, grads, stats

  return wrapped


def layouts(
  fun: Callable[..., Any],
  model: nnx.Module,
  *args: Any,
  has_aux: bool = False,
  **kwargs: Any,
) -> Any:
  """Which kernel axes are rows, for every captured layer: shapes only.

  Runs :func:`value_and_grad` on `fun(model, *args, **kwargs)` as
  `nnx.eval_shape` (no computation, the model is not touched) and returns
  the `layouts` argument the optimizers with per-layer state need for
  `nnx.LinearGeneral`, `nnx.Einsum` and layers inside `nnx.scan`/`nnx.vmap`.

  Example:
    >>> import jax.numpy as jnp, frog_optax as fo
    >>> from flax import nnx
    >>> model = nnx.LinearGeneral((4, 5), (2, 3), axis=(-2, -1),
    ...                           rngs=nnx.Rngs(0))
    >>> loss_fn = lambda model, x: model(x).sum()
    >>> layouts = fo.nnx.layouts(loss_fn, model, jnp.ones((8, 4, 5)))
    >>> optimizer = nnx.Optimizer(
    ...     model, fo.foof(0.1, layouts=layouts), wrt=nnx.Param)
  """
  grad_fn = value_and_grad(fun, sample_size=None, has_aux=has_aux)
  stats = nnx.eval_shape(
    lambda m, *a, **kw: grad_fn(m, *a, **kw)[2], model, *args, **kwargs
  )
  return layouts_lib.layout_tree(stats)


def describe(model_or_params: Any, stats: Any, exclude: Any = ()) -> str:
  """A table of which parameters FROG preconditions and which fall back.

  Accepts the model (its `nnx.Param`s are described) or a parameter tree,
  and as `exclude` the `nnx.Optimizer` (or its transformation) whose routing
  to show, or the `exclude` it was built with; see
  :func:`frog_optax.describe`.
  """
  params = model_or_params
  if isinstance(params, nnx.Module):
    params = nnx.to_pure_dict(nnx.state(params, nnx.Param))
  return describe_lib.describe(params, stats, exclude)


__all__ = [
  'FrogInputs',
  'FrogPerturbation',
  'describe',
  'layouts',
  'value_and_grad',
]
