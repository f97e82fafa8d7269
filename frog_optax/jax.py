"""FROG for any JAX function: models that are not made of Flax modules.

:func:`value_and_grad` is a drop-in for `jax.value_and_grad` on a function
of a parameter pytree (Equinox modules, plain dicts of arrays, Flax modules
that hold raw `self.param` kernels and call `jnp.dot`). It traces the
function to a jaxpr and finds its Dense and Conv layers there: a parameter
leaf that is one operand of exactly one `dot_general` or
`conv_general_dilated` (directly, or through a transpose or a cast) and is
used nowhere else is a kernel, and a leaf added to that op's outputs along
its output features is its bias. It then evaluates the same jaxpr with the
zero-perturbation tap on those outputs: one forward and one backward pass
give the value, the gradients (those of `jax.value_and_grad`) and the FROG
stats.

Nothing is guessed: a leaf used by any other op (a norm scale, an
embedding, a weight tied between two matmuls or constant across the steps
of a `lax.scan`, a weight inside `lax.cond` or a custom-derivative
function), or in a matmul the row form cannot express, gets an
:class:`frog_optax.UncapturedLayer` with the reason, goes to the fallback,
and :func:`frog_optax.describe` names it. The walk enters `jax.jit` calls,
`jax.checkpoint` (which stays a checkpoint) and `lax.scan`, where a weight
scanned over is a stack of layers (stacked stats, as for `nn.scan`).

The optimizer learns these layers from its `layouts`:
`fo.frog(..., layouts=fo.jax.layouts(loss_fn, params, *batch))`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax as jax_lib
import jax.numpy as jnp

from frog_optax._src import capture as capture_lib
from frog_optax._src import jaxpr_capture
from frog_optax._src import jaxpr_match
from frog_optax._src import paths
from frog_optax._src import routing
from frog_optax._src import stats as stats_lib
from frog_optax._src import validation


def _leaf_paths(params) -> list[str]:
  flat = jax_lib.tree_util.tree_flatten_with_path(params)[0]
  return [paths.path_name(paths.param_path(p)) for p, _ in flat]


def _module_level(kernel: str, bias: str | None, leaf_paths) -> str | None:
  """The module path when a layer is exactly a `{kernel, bias?}` dict."""
  module, _, name = kernel.rpartition('/')
  if name != 'kernel' or bias not in (None, routing.join_path(module, 'bias')):
    return None
  siblings = {
    p.rpartition('/')[2] for p in leaf_paths if p.rpartition('/')[0] == module
  }
  want = {'kernel'} if bias is None else {'kernel', 'bias'}
  return module if siblings == want else None


def value_and_grad(
  fun: Callable[..., Any],
  argnums: int = 0,
  *,
  sample_size: int | None,
  has_aux: bool = False,
  rng: jax_lib.Array | None = None,
  axis_name: Any = None,
) -> Callable[..., tuple[Any, Any, Any]]:
  """Like `jax.value_and_grad`, plus the FROG stats of the matched layers.

  Args:
    fun: the loss function; its parameters (any pytree of arrays) are
      argument `argnums`. The batch axis of every layer's inputs is their
      first axis (as after `jax.vmap` of a per-example Equinox model).
    argnums: index of the parameter argument (a single int).
    sample_size: examples per batch used for the Fisher (s); `None`, or a
      value >= the batch size, uses the whole batch.
    has_aux: whether `fun` returns `(loss, aux)`.
    rng: optional PRNG key: sample `sample_size` random examples (the same ones
      for every layer) instead of the strided examples `x[::B // s]`.
    axis_name: the data-parallel axis under `jax.pmap` or `jax.shard_map`
      (the samples of all replicas are gathered), as for
      :func:`frog_optax.linen.value_and_grad`.

  Returns:
    A function returning `(value, grads, stats)`. `stats` has the
    structure of the parameters: a :class:`frog_optax.LayerStats` in place
    of a `{'kernel', 'bias'?}` module dict whose leaves are exactly one
    layer's, else at the layer's kernel leaf (its `layout.bias_path` names
    the bias leaf); an :class:`frog_optax.UncapturedLayer` at every leaf
    the function uses that is not captured; `None` elsewhere.

  Example:
    >>> import jax, jax.numpy as jnp, frog_optax as fo
    >>> params = {'w': jnp.ones((4, 3)), 'b': jnp.zeros(3)}
    >>> def loss_fn(p, x):
    ...   return jnp.tanh(x @ p['w'] + p['b']).sum()
    >>> x = jnp.ones((8, 4))
    >>> loss, grads, stats = fo.jax.value_and_grad(
    ...     loss_fn, sample_size=4)(params, x)
    >>> stats['w'].inputs.shape, stats['w'].layout.bias_path
    ((4, 4), 'b')
    >>> tx = fo.frog(0.1, layouts=fo.jax.layouts(loss_fn, params, x))
    >>> updates, state = tx.update(
    ...     grads, tx.init(params), params, frog_stats=stats)
  """
  if sample_size is not None:
    validation.check_positive_int('sample_size', sample_size)
  if not isinstance(argnums, int) or isinstance(argnums, bool):
    raise ValueError(f'argnums must be a single int; got {argnums!r}.')

  def wrapped(*args, **kwargs):
    capture_lib.check_axis_name(axis_name)
    if not 0 <= argnums < len(args):
      raise ValueError(
        f'argnums={argnums} is not a positional argument of the call'
        f' ({len(args)} given).'
      )
    params = args[argnums]
    leaves, treedef = jax_lib.tree_util.tree_flatten(params)
    leaf_paths = _leaf_paths(params)
    rest = [a for i, a in enumerate(args) if i != argnums]
    out_tree = []

    def flat_fun(leaf_values, *rest_values):
      call = list(rest_values)
      call.insert(
        argnums, jax_lib.tree_util.tree_unflatten(treedef, leaf_values)
      )
      flat, tree = jax_lib.tree_util.tree_flatten(fun(*call, **kwargs))
      out_tree[:] = [tree]
      return flat

    closed = jax_lib.make_jaxpr(flat_fun)(leaves, *rest)
    rest_flat = jax_lib.tree_util.tree_leaves(rest)
    found = jaxpr_match.match(closed.jaxpr, len(leaves))

    def run(leaf_values, perturbations, capture):
      inputs = {}
      capture.perturbations = perturbations
      flat = jaxpr_capture.evaluate(
        closed.jaxpr,
        closed.consts,
        list(leaf_values) + list(rest_flat),
        capture,
        inputs,
      )
      out = jax_lib.tree_util.tree_unflatten(out_tree[0], flat)
      loss, aux = out if has_aux else (out, None)
      return loss, (aux, inputs)

    def zero_perturbations(discovery):
      return {
        k: jnp.zeros((*_stack(found, k), *s.shape), s.dtype)
        for k, s in discovery.shapes.items()
      }

    ((loss, (aux, inputs)), (leaf_grads, output_grads)), capture = (
      capture_lib.two_passes(
        lambda _: jaxpr_capture.Pass(found, sample_size, rng),
        *capture_lib.jax_passes(
          lambda capture, z, p: run(p, z, capture), leaves, zero_perturbations
        ),
      )
    )
    grads = jax_lib.tree_util.tree_unflatten(treedef, leaf_grads)
    stats = _stats(params, leaf_paths, found, capture, inputs, output_grads)
    stats = _gathered(stats, axis_name)
    value = (loss, aux) if has_aux else loss
    return value, grads, stats

  return wrapped


def _stack(found, key) -> tuple[int, ...]:
  """The leading layer axis of a tap inside a `lax.scan` over layers."""
  return (found.stacked[key],) if key in found.stacked else ()


def _stats(params, leaf_paths, found, capture, inputs, output_grads) -> Any:
  """The params-prefix stats tree of one pass."""
  leaf_entries = {leaf_paths[i]: u for i, u in found.refused.items()}
  module_entries = {}
  for leaf, op in found.kernels.items():
    kernel = leaf_paths[leaf]
    bias_leaf = found.biases.get(leaf)
    bias = None if bias_leaf is None else leaf_paths[bias_leaf]
    geometry, layout, batch = capture.statics[op]
    module = _module_level(kernel, bias, leaf_paths)
    if module is None:
      layout = dataclasses.replace(layout, bias_path=bias)
    layer_stats = capture_lib.assemble(
      [inputs[op]], [output_grads[op]], [batch], geometry, layout
    )
    if module is None:
      leaf_entries[kernel] = layer_stats
    else:
      module_entries[module] = layer_stats
  # A {kernel, bias} module the capture refused goes to the fallback whole.
  for path, entry in list(leaf_entries.items()):
    module, _, name = path.rpartition('/')
    if (
      isinstance(entry, stats_lib.UncapturedLayer)
      and name == 'kernel'
      and module not in module_entries
    ):
      module_entries[module] = entry
  return paths.place(params, {**leaf_entries, **module_entries})


def _gathered(stats, axis_name):
  if axis_name is None:
    return stats
  return jax_lib.tree.map(
    lambda s: (
      capture_lib.gather_samples(s, axis_name)
      if isinstance(s, stats_lib.LayerStats)
      else s
    ),
    stats,
    is_leaf=stats_lib.is_stats_leaf,
  )


def layouts(
  fun: Callable[..., Any],
  *args: Any,
  argnums: int = 0,
  has_aux: bool = False,
  **kwargs: Any,
) -> Any:
  """The optimizers' `layouts` for `fun`'s layers: shapes only.

  Runs :func:`value_and_grad` as `jax.eval_shape` (no computation). The
  tree names every matched layer (its kernel, bias and row axes) and every
  leaf that is not captured, which the optimizers then send to the
  fallback. Pass it to any optimizer of the family:
  `fo.frog(..., layouts=fo.jax.layouts(loss_fn, params, *batch))`.

  Args:
    fun: the loss function, as given to :func:`value_and_grad`.
    *args: its arguments (arrays or shapes), parameters at `argnums`.
    argnums: index of the parameter argument.
    has_aux: whether `fun` returns `(loss, aux)`.
    **kwargs: its keyword arguments.

  Returns:
    A params-prefix tree of :class:`frog_optax.ParamLayout` and
    :class:`frog_optax.UncapturedLayer` entries (`None` elsewhere).
  """
  stats = jax_lib.eval_shape(
    lambda *a, **kw: value_and_grad(
      fun, argnums, sample_size=None, has_aux=has_aux
    )(*a, **kw)[2],
    *args,
    **kwargs,
  )
  return routing.layout_tree(stats, keep_uncaptured=True)


__all__ = ['layouts', 'value_and_grad']
