"""Flax NNX capture: one backward pass gives loss, grads and FROG stats.

The NNX counterpart of :mod:`frog_optax.linen`. NNX has no method
interceptor, so while :func:`value_and_grad` runs the user's loss, the
`__call__` of `nnx.Linear`, `nnx.Conv`, `nnx.LinearGeneral` and `nnx.Einsum`
(so also the projections of `nnx.MultiHeadAttention`) is replaced at class
level (and restored afterwards). The replacement does what the linen
interceptor does: it keeps the (gradient-stopped) inputs of the sampled
examples and adds a zero perturbation to their outputs, whose gradient, from
the same backward pass as the parameter gradients, is dLoss/d(outputs).

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

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from frog_optax._src import capture as capture_lib
from frog_optax._src import describe as describe_lib
from frog_optax._src import nnx_capture
from frog_optax._src import paths
from frog_optax._src import routing
from frog_optax._src import validation
from frog_optax._src.nnx_capture import FrogInputs
from frog_optax._src.nnx_capture import FrogPerturbation


def value_and_grad(
  fun: Callable[..., Any],
  *,
  sample_size: int | None,
  has_aux: bool = False,
  rng: jax.Array | None = None,
  axis_name: Any = None,
  exclude: Any = (),
) -> Callable[..., tuple[Any, Any, Any]]:
  """Like `nnx.value_and_grad(fun)`, plus the FROG stats of captured layers.

  `fun(model, *args, **kwargs)` takes the model first. One forward and one
  backward pass compute the value, the gradients of the model's `nnx.Param`s
  (identical to `nnx.value_and_grad`, including the updates of other state
  such as `BatchNorm` statistics) and, for the sampled examples of each
  `nnx.Linear`, `nnx.Conv`, `nnx.LinearGeneral` and `nnx.Einsum`, their
  inputs and output gradients. Graph nodes among the arguments (an
  `nnx.Rngs` for dropout) are updated as `nnx.value_and_grad` updates them.
  A layer that is not captured (another type, a configuration the capture
  does not model, or one in `exclude`) runs unchanged and gets a
  :class:`frog_optax.UncapturedLayer` entry with the reason, as in
  :func:`frog_optax.linen.value_and_grad`.

  Args:
    fun: the loss function; its first argument is the model.
    sample_size: examples per batch used for the Fisher (s); `None`, or a
      value >= the batch size, uses the whole batch.
    has_aux: whether `fun` returns `(loss, aux)`.
    rng: optional PRNG key: `sample_size` random examples instead of the default
      strided examples `x[::B // s]`.
    axis_name: the data-parallel axis under `jax.pmap` or `jax.shard_map`:
      the samples of all replicas are gathered along it, so that every
      replica computes the same update (see
      :func:`frog_optax.linen.value_and_grad`).
    exclude: module paths (or path prefixes) not to capture, or the
      optimizer (or `nnx.Optimizer`) whose `exclude` to use.

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
  exclude = routing.exclude_of(exclude)

  def wrapped(model, *args, **kwargs):
    capture_lib.check_axis_name(axis_name)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    routing.preconditioned_modules(params, exclude)  # names unknown entries

    def run(session, model, *args, **kwargs):
      with nnx_capture.sessions.scope(session), nnx_capture.capturing_layers():
        out = fun(model, *args, **kwargs)
      return out if has_aux else (out, None)

    def discover(discovery):
      # Shapes only, on copies: neither the model nor graph nodes among the
      # arguments (an `nnx.Rngs` for dropout) are touched.
      def trace(m, *a, **kw):
        run(discovery, m, *a, **kw)
        return nnx.state(m, FrogPerturbation)

      return nnx.eval_shape(trace, model, *args, **kwargs)

    def differentiate(session, zeros):
      # The perturbations are Variables of the layers; the arguments go
      # through nnx.value_and_grad (not a closure), so that their graph
      # nodes are updated as nnx.value_and_grad updates them.
      nnx.update(model, zeros)
      wrt = nnx.DiffState(0, nnx.Any(nnx.Param, FrogPerturbation))
      return nnx.value_and_grad(
        lambda m, *a, **kw: run(session, m, *a, **kw),
        argnums=wrt,
        has_aux=True,
      )(model, *args, **kwargs)

    with nnx_capture.tagged(model):
      ((loss, aux), all_grads), session = capture_lib.two_passes(
        capture_lib.Recorder.passes(sample_size, rng, exclude),
        discover,
        differentiate,
      )
      inputs = nnx_capture.calls(
        nnx.state(model, FrogInputs), nnx_capture.INPUTS_PREFIX
      )
    perturbation_grads, grads = nnx.split_state(
      all_grads, FrogPerturbation, ...
    )
    output_grads = nnx_capture.calls(
      perturbation_grads, nnx_capture.PERTURBATION_PREFIX
    )
    captured = session.layer_stats(inputs, output_grads, axis_name)
    uncaptured = nnx_capture.uncaptured_modules(model) | session.uncaptured
    stats = paths.place(nnx.to_pure_dict(grads), {**uncaptured, **captured})
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
  return routing.layout_tree(stats)


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
