"""Flax linen capture: one backward pass gives loss, grads and FROG stats.

The user wraps `model.apply` once with :func:`capture` and replaces
`jax.value_and_grad` by :func:`value_and_grad`. Inside, a method interceptor
on `nn.Dense`, `nn.Conv`, `nn.DenseGeneral` and `nn.Einsum` (so also the
projections of `nn.MultiHeadDotProductAttention`) does two things for the
sampled examples of the batch:
it `sow`s their (gradient-stopped) inputs, and it adds a zero "perturbation"
variable to their outputs (an identity in the forward pass: only
derivatives see it). The gradient of the loss with respect to those
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

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax.training import train_state

from frog_optax._src import capture as capture_lib
from frog_optax._src import describe as describe_lib
from frog_optax._src import linen_capture
from frog_optax._src import paths
from frog_optax._src import routing
from frog_optax._src import validation
from frog_optax._src.linen_capture import INPUTS
from frog_optax._src.linen_capture import PERTURBATIONS
from frog_optax._src.linen_capture import capture


def value_and_grad(
  fun: Callable[..., Any],
  argnums: int = 0,
  *,
  sample_size: int | None,
  has_aux: bool = False,
  rng: jax.Array | None = None,
  axis_name: Any = None,
  exclude: Any = (),
) -> Callable[..., tuple[Any, Any, Any]]:
  """Like `jax.value_and_grad`, plus the FROG stats of captured layers.

  `fun` must call a function wrapped by :func:`capture`. One forward and one
  backward pass compute the value, the gradients (identical to
  `jax.value_and_grad`) and, for the sampled examples of each captured
  layer, its inputs and output gradients. Captured layers: `nn.Dense`,
  `nn.DenseGeneral`, `nn.Einsum` and `nn.Conv` (1-D/2-D/3-D, any padding,
  dilation and feature groups), so also the projections of
  `nn.MultiHeadDotProductAttention`, and any of them stacked by `nn.scan`
  (give `INPUTS` and `PERTURBATIONS` the parameters' layer axis).

  A layer with a kernel that is not captured is never an error here: other
  layer types, configurations the capture does not model (a custom
  `dot_general`, a masked kernel, an Einsum without a batch axis, ...) and
  the layers in `exclude` run unchanged and get a
  :class:`frog_optax.UncapturedLayer` entry with the reason. An optimizer
  sends them to its fallback when its own `exclude` names them, and raises
  an error naming them when it does not.

  Args:
    fun: the loss function.
    argnums: index of the parameter argument (a single int).
    sample_size: examples per batch used for the Fisher (s); `None`, or a
      value >= the batch size, uses the whole batch.
    has_aux: whether `fun` returns `(loss, aux)`.
    rng: optional PRNG key: sample `sample_size` random examples (the same ones
      for every layer) instead of the default strided examples `x[::B // s]`.
      Strided examples stay on their device when the batch axis is sharded
      (let `sample_size` divide the batch and the device count divide
      `sample_size`); random examples are gathered across devices.
    axis_name: under `jax.pmap` or `jax.shard_map` with per-replica
      batches, the name of the data-parallel axis: the sampled inputs and
      output gradients of all replicas are gathered along it
      (`lax.all_gather`), so every replica holds the same stats and, with
      gradients averaged by `lax.pmean`, computes the same update. Each
      replica samples `sample_size` of its own examples. Without it, inside
      a named axis, a warning says so. Not needed under `jax.jit` with
      sharded arrays (the stats are global there).
    exclude: module paths (or path prefixes) not to capture, so that no
      work is spent on them: those the optimizer excludes, or the optimizer
      itself (e.g. `exclude=tx` for `tx = fo.frog(..., exclude=...)`).

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
  exclude = routing.exclude_of(exclude)

  def wrapped(*args, **kwargs):
    capture_lib.check_axis_name(axis_name)
    params = args[argnums]
    routing.preconditioned_modules(params, exclude)  # names unknown entries

    def run(session, perturbations, params):
      call_args = list(args)
      call_args[argnums] = params
      session.perturbations = [] if perturbations is None else perturbations
      with linen_capture.sessions.scope(session):
        out = fun(*call_args, **kwargs)
      loss, aux = out if has_aux else (out, None)
      return loss, (aux, session.collected_inputs)

    ((loss, (aux, _)), (grads, output_grads)), session = capture_lib.two_passes(
      linen_capture.Session.passes(sample_size, rng, exclude),
      *capture_lib.jax_passes(
        run, params, linen_capture.discovered_perturbations
      ),
    )
    captured = linen_capture.assemble_stats(session, output_grads, axis_name)
    stats = paths.place(params, {**session.uncaptured, **captured})
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
  return routing.layout_tree(stats)


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
