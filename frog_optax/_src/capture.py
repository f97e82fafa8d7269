"""The framework-neutral half of the capture: rows, layer maps and stats.

Both front ends (`frog_optax.linen`, `frog_optax.nnx`) intercept the call of
a layer, take its output `y = f(x)`, and hand both here. This module picks
the sampled rows of the batch, brings the sampled inputs to the row-stacked
form the optimizers use (`(n, D_in)` for Dense-like layers, padded
`(n, *spatial, c_in)` for convolutions), and builds the zero perturbation
whose gradient is dLoss/dy for those rows, in the matching form
(`(n, rows)` or `(n, *out_spatial, c_out)`). After the backward pass,
:func:`assemble` turns what each layer saw into its `LayerStats`.
"""

import contextlib
import dataclasses
import math
import threading
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum
from jax import lax

from frog_optax._src import stats as stats_lib

Unsupported = Callable[[str], Exception]  # why -> the error to raise


def unsupported_error(layer_type: str, path: str, why: str) -> Exception:
  """The one error for a layer the capture cannot handle, in both APIs."""
  return NotImplementedError(
    f'frog_optax cannot capture {layer_type} at {path!r}: {why}.'
    f" Exclude it with frog(..., exclude=('{path}',))."
  )


# Why a captured layer type is refused, in both front ends.
CUSTOM_DOT_GENERAL = 'a custom dot_general is set'
CUSTOM_CONV = 'a custom conv_general_dilated is set'
CUSTOM_EINSUM = 'a custom einsum_op is set'
MASKED = 'masked kernels are not supported'
BATCHED_KERNEL = 'a batched kernel (batch_dims / batch_axis) is set'


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


def as_tuple(value, n):
  if value is None:
    return (1,) * n
  if isinstance(value, int):
    return (value,) * n
  return tuple(value)


# ----------------------------------------------------------------------------
# Rows of the batch.


def rows_of(
  x: jax.Array,
  sample_size: int | None,
  rng: jax.Array | None,
  where: str,
  unsupported: Unsupported,
) -> jax.Array | slice:
  """The sampled rows of a layer's inputs `x`; `where` names the layer."""
  if x.ndim < 1:
    raise unsupported('its inputs are a scalar')
  if x.shape[0] == 0:
    raise ValueError(
      f'{where} was called on an empty batch (inputs of shape {x.shape}):'
      " FROG estimates each layer's Fisher from the examples of the batch,"
      ' so every call needs at least one example.'
    )
  return sample_rows(x.shape[0], sample_size, rng)


def sample_rows(
  batch: int, sample_size: int | None, rng: jax.Array | None
) -> jax.Array | slice:
  s = batch if sample_size is None or sample_size >= batch else sample_size
  if rng is None:
    # Strided rows stay local to each shard when the batch axis is sharded.
    step = batch // s
    return slice(0, step * s, step)
  return jnp.sort(jax.random.choice(rng, batch, (s,), replace=False))


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


def take_rows(a: jax.Array, rows: jax.Array | slice) -> jax.Array:
  if isinstance(rows, slice):
    return _strided(a, rows)[:, 0]
  return a[rows]


def add_to_rows(
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


# ----------------------------------------------------------------------------
# Dense-like layers: which axes are samples, inputs and outputs.


@dataclasses.dataclass(frozen=True)
class DenseMap:
  """A contraction of `x` with a kernel as `(samples, D_in) @ (D_in, rows)`.

  Attributes:
    x_perm: order of the axes of `x` that puts samples first and the
      contracted axes last, in kernel order.
    num_input_axes: contracted axes of `x`.
    y_perm: order of the axes of `y` that puts samples first (as in
      `x_perm`) and the output axes last, in the order of the rows.
    num_output_axes: output axes of `y` (their product is the rows).
    layout: how the kernel maps to `(D_in, rows)`.
  """

  x_perm: tuple[int, ...]
  num_input_axes: int
  y_perm: tuple[int, ...]
  num_output_axes: int
  layout: stats_lib.ParamLayout


def _layout(num_in, num_out, kernel_perm=None) -> stats_lib.ParamLayout:
  if kernel_perm == tuple(range(len(kernel_perm or ()))):
    kernel_perm = None
  if num_in == 1 and num_out == 1 and kernel_perm is None:
    return stats_lib.ParamLayout()  # already (D_in, rows)
  return stats_lib.ParamLayout(num_input_axes=num_in, kernel_perm=kernel_perm)


def dense_map(x_ndim: int, unsupported: Unsupported) -> DenseMap:
  """`nn.Dense` / `nnx.Linear`: the last axis of `x` is contracted."""
  return dense_general_map(x_ndim, (-1,), 1, unsupported)


def dense_general_map(
  x_ndim: int,
  axis: tuple[int, ...],
  num_features: int,
  unsupported: Unsupported,
) -> DenseMap:
  """`nn.DenseGeneral` without batch dims: `axis` of `x` contracted.

  Flax sorts `axis` before it builds the kernel (whose input axes follow the
  sorted order), so the inputs are paired with the kernel in sorted order
  whatever order the user wrote.
  """
  axis = tuple(sorted(a % x_ndim for a in axis))
  if 0 in axis or len(axis) == x_ndim:
    raise unsupported(
      f'it contracts axis 0 of its {x_ndim}-D inputs, so there is no batch'
      ' axis to sample from'
    )
  rest = tuple(a for a in range(x_ndim) if a not in axis)
  y_ndim = len(rest) + num_features
  return DenseMap(
    x_perm=rest + axis,
    num_input_axes=len(axis),
    y_perm=tuple(range(y_ndim)),
    num_output_axes=num_features,
    layout=_layout(len(axis), num_features),
  )


def einsum_map(
  einsum_str: str,
  x_shape: tuple[int, ...],
  kernel_shape: tuple[int, ...],
  unsupported: Unsupported,
) -> DenseMap:
  """`nn.Einsum`: `y = einsum(einsum_str, x, kernel)`.

  Supported when every kernel label is either contracted with `x` or an
  output feature, and the first axis of `x` is the first axis of `y` (the
  batch to sample from).
  """
  operands, result, _ = opt_einsum.parser.parse_einsum_input(
    (
      einsum_str,
      jax.ShapeDtypeStruct(x_shape, jnp.float32),
      jax.ShapeDtypeStruct(kernel_shape, jnp.float32),
    )
  )
  inputs, kernel = operands.split(',')
  for labels in (inputs, kernel, result):
    if len(set(labels)) != len(labels):
      raise unsupported(f'{einsum_str!r} repeats a label within an operand')
  shared = set(inputs) & set(kernel) & set(result)
  if shared:
    raise unsupported(
      f'{einsum_str!r} keeps kernel labels {sorted(shared)} in the inputs'
      ' and the outputs (a batched kernel)'
    )
  summed = (set(kernel) ^ set(inputs)) - set(result)
  if summed:
    raise unsupported(
      f'{einsum_str!r} sums labels {sorted(summed)} of one operand only'
    )
  if not inputs or not result or inputs[0] != result[0] or inputs[0] in kernel:
    raise unsupported(
      f'{einsum_str!r} does not keep the first input axis as the first'
      ' output axis, so there is no batch axis to sample from'
    )
  contracted = [c for c in kernel if c in inputs]
  outputs = [c for c in result if c in kernel]
  samples = [c for c in inputs if c in result]
  return DenseMap(
    x_perm=tuple(inputs.index(c) for c in samples + contracted),
    num_input_axes=len(contracted),
    y_perm=tuple(result.index(c) for c in samples + outputs),
    num_output_axes=len(outputs),
    layout=_layout(
      len(contracted),
      len(outputs),
      tuple(kernel.index(c) for c in contracted + outputs),
    ),
  )


# ----------------------------------------------------------------------------
# Convolutions: the lax conv that Flax runs, with its padding made explicit.


def conv_lax_inputs(module: Any, x: jax.Array, unsupported: Unsupported):
  """The inputs and geometry of the lax conv a Flax `Conv` runs.

  `module` is a linen `nn.Conv` or an `nnx.Conv` (same attribute names).
  """
  kernel_size = as_tuple(module.kernel_size, 1)
  n = len(kernel_size)
  strides = as_tuple(module.strides, n)
  input_dilation = as_tuple(module.input_dilation, n)
  kernel_dilation = as_tuple(module.kernel_dilation, n)
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
      raise unsupported('CAUSAL padding is 1-D only')
    x = jnp.pad(
      x, [(0, 0), ((kernel_size[0] - 1) * kernel_dilation[0], 0), (0, 0)]
    )
    padding = 'VALID'
  if isinstance(padding, str):
    if padding not in ('SAME', 'VALID', 'SAME_LOWER'):
      raise unsupported(f'padding {padding!r} is unknown')
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


# ----------------------------------------------------------------------------
# One call of one layer.


@dataclasses.dataclass
class Sampled:
  """What one call of a layer contributes.

  Attributes:
    inputs: the sampled inputs in row-stacked form (gradient stopped).
    perturbation_shape: shape of the zero perturbation (the row-stacked
      output gradients of the sample have this shape).
    add_perturbation: `p -> y` with `p` added to the sampled rows.
    geometry: the layer's static geometry.
    layout: how its parameters map to the row-stacked form.
  """

  inputs: jax.Array
  perturbation_shape: tuple[int, ...]
  add_perturbation: Callable[[jax.Array], jax.Array]
  geometry: stats_lib.LayerGeometry
  layout: stats_lib.ParamLayout


def _rows_shape(y: jax.Array, rows) -> tuple[int, ...]:
  return jax.eval_shape(lambda t: take_rows(t, rows), y).shape


def sample_dense(x: jax.Array, y: jax.Array, rows, dense: DenseMap) -> Sampled:
  """A Dense-like call: inputs `(n, D_in)`, perturbation `(n, rows)`."""
  x_rows = jnp.transpose(take_rows(x, rows), dense.x_perm)
  n_in = dense.num_input_axes
  x_rows = x_rows.reshape((-1, math.prod(x_rows.shape[-n_in:])))
  y_rows_shape = _rows_shape(y, rows)
  permuted = tuple(y_rows_shape[a] for a in dense.y_perm)
  n_out = dense.num_output_axes
  p_shape = (math.prod(permuted[:-n_out]), math.prod(permuted[-n_out:]))
  inverse = tuple(np.argsort(dense.y_perm))

  def add_perturbation(p):
    return add_to_rows(y, rows, p.reshape(permuted).transpose(inverse))

  return Sampled(
    inputs=lax.stop_gradient(x_rows),
    perturbation_shape=p_shape,
    add_perturbation=add_perturbation,
    geometry=stats_lib.DenseGeometry(),
    layout=dense.layout,
  )


def sample_conv(
  module: Any, x: jax.Array, y: jax.Array, rows, unsupported: Unsupported
) -> Sampled:
  """A convolution: inputs `(n, *spatial, c_in)`, extra batch axes folded."""
  num_feature_dims = len(as_tuple(module.kernel_size, 1)) + 1
  if x.ndim <= num_feature_dims:
    raise unsupported(f'inputs of shape {x.shape} have no batch axis')
  x_rows = take_rows(x, rows)
  x_rows = x_rows.reshape((-1,) + x.shape[x.ndim - num_feature_dims :])
  x_rows, geometry = conv_lax_inputs(module, x_rows, unsupported)
  y_rows_shape = _rows_shape(y, rows)
  leading = y_rows_shape[: len(y_rows_shape) - num_feature_dims]
  p_shape = (math.prod(leading),) + y_rows_shape[len(leading) :]
  return Sampled(
    inputs=lax.stop_gradient(x_rows),
    perturbation_shape=p_shape,
    add_perturbation=lambda p: add_to_rows(y, rows, p.reshape(y_rows_shape)),
    geometry=geometry,
    layout=stats_lib.ParamLayout(),
  )


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
    rng: optional key for random rows.
    kinds: `{path: (geometry, layout)}`; every call must agree.
    batch_sizes: `{path: {call key: batch size}}`, keyed by call so that a
      body traced more than once (nn.scan, nnx.scan) counts once.
  """

  discover: bool
  sample_size: int | None
  rng: jax.Array | None
  kinds: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)
  batch_sizes: dict[str, dict[Any, int]] = dataclasses.field(
    default_factory=dict
  )

  def sample(
    self,
    path: str,
    layer_type: str,
    x: jax.Array,
    call_key: Any,
    sample_call: Callable[[Any], Sampled],
  ) -> Sampled:
    """Samples one call of a layer: `sample_call(rows)`, checked, recorded."""
    unsupported = lambda why: unsupported_error(layer_type, path, why)
    rows = rows_of(
      x, self.sample_size, self.rng, f'{layer_type} at {path!r}', unsupported
    )
    sampled = sample_call(rows)
    kind = (sampled.geometry, sampled.layout)
    if self.kinds.setdefault(path, kind) != kind:
      raise unsupported('its calls have different geometries')
    self.batch_sizes.setdefault(path, {})[call_key] = x.shape[0]
    return sampled

  def layer_stats(
    self,
    inputs: dict[str, list[jax.Array]],
    output_grads: dict[str, list[jax.Array]],
    axis_name: Any,
  ) -> dict[str, stats_lib.LayerStats]:
    """`{path: LayerStats}` from every call's inputs and output gradients."""
    return {
      path: gather_samples(
        assemble(
          path,
          xs,
          output_grads[path],
          list(self.batch_sizes[path].values()),
          *self.kinds[path],
        ),
        axis_name,
      )
      for path, xs in inputs.items()
    }


# ----------------------------------------------------------------------------
# After the backward pass.


def assemble(
  name: str,
  inputs: list[jax.Array],
  output_grads: list[jax.Array],
  batch_sizes: list[int],
  geometry: stats_lib.LayerGeometry,
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
  sample_ndim = (
    2
    if isinstance(geometry, stats_lib.DenseGeometry)
    else geometry.num_spatial_dims + 2
  )
  k = inputs[0].ndim - sample_ndim
  shapes = {(x.shape[:k], x.shape[k + 1 :]) for x in inputs}
  if k < 0 or len(shapes) > 1:
    raise NotImplementedError(
      f'{name!r} was called on inputs of different shapes'
      f' {[x.shape for x in inputs]}; FROG stats cannot be combined.'
      ' Exclude it.'
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
