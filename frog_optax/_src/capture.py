"""The capture core both front ends share: records, refusals and stats.

Both front ends (`frog_optax.linen`, `frog_optax.nnx`) intercept the call of
a layer and keep only their framework hook: the linen method interceptor,
the NNX class patch. Each call goes through one :class:`Recorder` (examples of
the batch from `sampling`, the layer's map from `layer_maps`, the checks
and records), and after the backward pass :meth:`Recorder.layer_stats`
turns what every layer saw into its `LayerStats`, gathered across replicas
when an `axis_name` is given.

A layer the capture cannot sample is never fatal: its call runs unchanged,
and it becomes an `UncapturedLayer` with the reason, which the optimizers
send to the fallback when their `exclude` names it (and refuse, naming it,
when it does not). Layers excluded from the capture are not sampled at all.
"""

import contextlib
import dataclasses
import threading
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from frog_optax._src import geometry as geometry_lib
from frog_optax._src import layer_maps
from frog_optax._src import routing
from frog_optax._src import sampling
from frog_optax._src import scopes
from frog_optax._src import stats as stats_lib


class SessionSlot:
  """This thread's current capture session (one slot per front end)."""

  def __init__(self):
    self._local = threading.local()

  def current(self) -> Any:
    return getattr(self._local, 'session', None)

  @contextlib.contextmanager
  def scope(self, session: Any):
    previous = self.current()
    self._local.session = session
    try:
      yield session
    finally:
      self._local.session = previous


# ----------------------------------------------------------------------------
# One pass of value_and_grad: what the front ends record, and the stats.


@dataclasses.dataclass
class Recorder:
  """What one pass of `value_and_grad` saw of every captured layer.

  Both front ends hold one per pass (the shape-discovery pass and the real
  one); only static facts live here. Traced values travel through the
  framework (linen collections, NNX Variables).

  Attributes:
    discover: whether this is the shape-discovery pass.
    sample_size: examples per call used for the Fisher (`None`: all).
    rng: optional key for random examples.
    exclude: module paths (or prefixes) not to capture.
    kinds: `{path: (geometry, layout)}`; every call must agree.
    layer_types: `{path: class name}` of the sampled layers.
    batch_sizes: `{path: {call key: batch size}}`, keyed by call so that a
      body traced more than once (nn.scan, nnx.scan) counts once.
    uncaptured: `{path: UncapturedLayer}` of the layers with a kernel that
      were not captured: refused, excluded, or of a type not captured.
  """

  discover: bool
  sample_size: int | None
  rng: jax.Array | None
  exclude: tuple[str, ...] = ()
  kinds: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)
  layer_types: dict[str, str] = dataclasses.field(default_factory=dict)
  batch_sizes: dict[str, dict[Any, int]] = dataclasses.field(
    default_factory=dict
  )
  uncaptured: dict[str, stats_lib.UncapturedLayer] = dataclasses.field(
    default_factory=dict
  )

  @classmethod
  def passes(cls, sample_size, rng, exclude) -> Callable[[Any], 'Recorder']:
    """`new_pass` of :func:`two_passes`: the real pass keeps the refusals."""
    return lambda discovery: cls(
      discovery is None,
      sample_size,
      rng,
      exclude,
      uncaptured={} if discovery is None else dict(discovery.uncaptured),
    )

  def refuse(self, path: str, layer_type: str, why: str) -> None:
    """Records that `path` is not captured (the first reason is kept)."""
    self.uncaptured.setdefault(path, stats_lib.UncapturedLayer(layer_type, why))

  def sample(
    self,
    path: str,
    layer_type: str,
    x: jax.Array,
    call_key: Any,
    sample_call: Callable[[Any], layer_maps.Sampled],
  ) -> layer_maps.Sampled | None:
    """Samples one call of a layer: `sample_call(examples)`, checked, recorded.

    Returns `None`, and records why, when the layer is not captured: it is
    excluded, it was refused before, or this call cannot be sampled
    (`sample_call` raises `CaptureRefused`). The caller then returns the
    layer's outputs untouched.
    """
    if routing.is_excluded(path, self.exclude):
      self.refuse(path, layer_type, stats_lib.EXCLUDED)
    if path in self.uncaptured:
      return None
    try:
      with jax.named_scope(scopes.CAPTURE):
        examples = sampling.examples_of(
          x, self.sample_size, self.rng, f'{layer_type} at {path!r}'
        )
        sampled = sample_call(examples)
      kind = (sampled.geometry, sampled.layout)
      if self.kinds.setdefault(path, kind) != kind:
        raise stats_lib.CaptureRefused('its calls have different geometries')
    except stats_lib.CaptureRefused as refused:
      self.refuse(path, layer_type, refused.why)
      return None
    self.layer_types[path] = layer_type
    self.batch_sizes.setdefault(path, {})[call_key] = x.shape[0]
    return sampled

  def layer_stats(
    self,
    inputs: dict[str, list[jax.Array]],
    output_grads: dict[str, list[jax.Array]],
    axis_name: Any,
  ) -> dict[str, stats_lib.LayerStats]:
    """`{path: LayerStats}` from every call's inputs and output gradients.

    Layers refused after some of their calls were recorded are left out
    (they are in `uncaptured`), and so are layers whose calls cannot be
    combined.
    """
    stats = {}
    with jax.named_scope(scopes.CAPTURE):
      for path, xs in inputs.items():
        if path in self.uncaptured:
          continue
        try:
          layer_stats = assemble(
            xs,
            output_grads[path],
            list(self.batch_sizes[path].values()),
            *self.kinds[path],
          )
        except stats_lib.CaptureRefused as refused:
          self.refuse(path, self.layer_types[path], refused.why)
          continue
        stats[path] = gather_samples(layer_stats, axis_name)
    return stats


# ----------------------------------------------------------------------------
# The two passes of value_and_grad.


def two_passes(
  new_pass: Callable[[Any], Any],
  discover: Callable[[Any], Any],
  differentiate: Callable[[Any, Any], Any],
) -> tuple[Any, Any]:
  """Shape discovery, then one backward pass over (params, perturbations).

  Every front end captures this way, in its framework's transforms
  (:func:`jax_passes`, or NNX's, which carry graph state). The first pass
  only traces: which layers are captured, and the shapes of their zero
  output perturbations. The second differentiates the loss with respect to
  the parameters and those zeros at once; the gradient of a zero
  perturbation is the layer's output gradient on the sampled examples.

  Args:
    new_pass: `(discovery) -> recorder`; `discovery` is `None` for the
      discovery pass itself, else its recorder.
    discover: `(discovery recorder) -> shapes` of the zero perturbations.
    differentiate: `(recorder, zeros) -> (value, grads)`.

  Returns:
    `((value, grads), recorder)` of the real pass.
  """
  discovery = new_pass(None)
  shapes = discover(discovery)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  recorder = new_pass(discovery)
  return differentiate(recorder, zeros), recorder


def jax_passes(
  run: Callable[[Any, Any, Any], tuple[jax.Array, Any]],
  params: Any,
  zero_perturbations: Callable[[Any], Any],
) -> tuple[Callable[[Any], Any], Callable[[Any, Any], Any]]:
  """`(discover, differentiate)` of :func:`two_passes` in `jax` transforms.

  Args:
    run: `(recorder, perturbations, params) -> (loss, aux)`, the user's
      function with the front end's hook active; `perturbations` is `None`
      in the discovery pass.
    params: the differentiated argument; the gradients are `(grads,
      output_grads)`.
    zero_perturbations: `(discovery recorder) -> zeros`, called at the end
      of the discovery trace; only the shapes of what it returns are kept.
  """

  def discover(discovery):
    return jax.eval_shape(
      lambda p: (run(discovery, None, p), zero_perturbations(discovery)),
      params,
    )[1]

  def differentiate(recorder, zeros):
    return jax.value_and_grad(
      lambda p, z: run(recorder, z, p), argnums=(0, 1), has_aux=True
    )(params, zeros)

  return discover, differentiate


# ----------------------------------------------------------------------------
# After the backward pass.


def assemble(
  inputs: list[jax.Array],
  output_grads: list[jax.Array],
  batch_sizes: list[int],
  geometry: geometry_lib.LayerGeometry,
  layout: stats_lib.ParamLayout,
) -> stats_lib.LayerStats:
  """The `LayerStats` of one layer from all its calls.

  Calls are concatenated along the sample axis. Leading axes beyond the
  row-stacked form come from `nn.scan` (the same stacked layer axes as the
  parameters) and are recorded in the layout.

  A mean-reduced loss scales the output gradients by 1/B: they are
  multiplied by the total batch size of all calls, one factor for every
  call, so that a layer called on x1 and x2 weighs its samples as when
  called once on their concatenation (a factor per call would re-weight
  the calls against each other).
  """
  k = inputs[0].ndim - geometry.sample_ndim
  shapes = {(x.shape[:k], x.shape[k + 1 :]) for x in inputs}
  if k < 0 or len(shapes) > 1:
    raise stats_lib.CaptureRefused(
      f'its calls have inputs of different shapes {[x.shape for x in inputs]},'
      ' whose samples cannot be combined'
    )
  total = sum(batch_sizes)
  dy = [d * total for d in output_grads]
  return stats_lib.LayerStats(
    inputs=jnp.concatenate(inputs, axis=k) if len(inputs) > 1 else inputs[0],
    output_grads=jnp.concatenate(dy, axis=k) if len(dy) > 1 else dy[0],
    geometry=geometry,
    layout=dataclasses.replace(layout, stacked_axes=k),
  )


# ----------------------------------------------------------------------------
# Data parallelism over a named axis (pmap, shard_map).


class UnsyncedStatsWarning(UserWarning):
  """The capture runs over a named axis but does not gather its stats."""


def _bound_axis_names() -> list[Any]:
  try:  # private JAX API: without it, no warning (nothing breaks)
    from jax._src import core  # noqa: PLC0415

    return list(core.unsafe_get_axis_names())
  except Exception:  # noqa: BLE001
    return []


def check_axis_name(axis_name: Any) -> None:
  """Warns when replicas would precondition with their own stats."""
  if axis_name is not None:
    return
  names = _bound_axis_names()
  if names:
    warnings.warn(
      f'value_and_grad runs inside the named axes {names} (pmap, shard_map'
      ' or a named vmap) without axis_name: each replica captures its own'
      ' sample, so replicas that average their gradients still'
      ' precondition differently and drift apart. Pass'
      f' value_and_grad(..., axis_name={names[0]!r}) to gather the samples'
      ' of all replicas.',
      UnsyncedStatsWarning,
      stacklevel=4,
    )


def gather_samples(
  layer_stats: stats_lib.LayerStats, axis_name: Any
) -> stats_lib.LayerStats:
  """The samples of every replica along `axis_name`, in replica order.

  Every replica then holds the same stats (bit for bit), so with averaged
  gradients every replica computes the same update.
  """
  if axis_name is None:
    return layer_stats
  k = layer_stats.layout.stacked_axes
  gather = lambda a: lax.all_gather(a, axis_name, axis=k, tiled=True)
  return dataclasses.replace(
    layer_stats,
    inputs=gather(layer_stats.inputs),
    output_grads=gather(layer_stats.output_grads),
  )
