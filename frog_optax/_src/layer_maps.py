"""Each captured layer call as a map on row-stacked weights.

A Dense-like call (`Dense`, `DenseGeneral`, `Einsum`, and their NNX twins)
becomes `(samples, D_in) @ (D_in, rows)` by an axis permutation of its
inputs and outputs; a convolution becomes the lax convolution Flax runs,
with its padding made explicit. `sample_dense` / `sample_conv` return what
one call contributes: the sampled inputs in that form, and the zero
perturbation whose gradient is dLoss/d(outputs) of the sampled examples. A call
that cannot be written so raises `CaptureRefused` with the reason.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum
from jax import lax

from frog_optax._src import geometry as geometry_lib
from frog_optax._src import stats as stats_lib
from frog_optax._src.sampling import take_examples
from frog_optax._src.sampling import tap_examples
from frog_optax._src.stats import CaptureRefused


def as_tuple(value, n):
  if value is None:
    return (1,) * n
  if isinstance(value, int):
    return (value,) * n
  return tuple(value)


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
    y_batch_axis: the axis of `y` that carries the batch axis of `x` (its
      first); `y_perm` orders the axes of `y` with this one moved first.
  """

  x_perm: tuple[int, ...]
  num_input_axes: int
  y_perm: tuple[int, ...]
  num_output_axes: int
  layout: stats_lib.ParamLayout
  y_batch_axis: int = 0


def kernel_layout(num_in, num_out, kernel_perm=None) -> stats_lib.ParamLayout:
  if kernel_perm == tuple(range(len(kernel_perm or ()))):
    kernel_perm = None
  if num_in == 1 and num_out == 1 and kernel_perm is None:
    return stats_lib.ParamLayout()  # already (D_in, rows)
  return stats_lib.ParamLayout(num_input_axes=num_in, kernel_perm=kernel_perm)


def dense_map(x_ndim: int) -> DenseMap:
  """`nn.Dense` / `nnx.Linear`: the last axis of `x` is contracted."""
  return dense_general_map(x_ndim, (-1,), 1)


def dense_general_map(
  x_ndim: int, axis: tuple[int, ...], num_features: int
) -> DenseMap:
  """`nn.DenseGeneral` without batch dims: `axis` of `x` contracted.

  Flax sorts `axis` before it builds the kernel (whose input axes follow the
  sorted order), so the inputs are paired with the kernel in sorted order
  whatever order the user wrote.
  """
  axis = tuple(sorted(a % x_ndim for a in axis))
  if 0 in axis or len(axis) == x_ndim:
    raise CaptureRefused(
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
    layout=kernel_layout(len(axis), num_features),
  )


def einsum_map(
  einsum_str: str, x_shape: tuple[int, ...], kernel_shape: tuple[int, ...]
) -> DenseMap:
  """`nn.Einsum`: `y = einsum(einsum_str, x, kernel)`.

  Supported when every kernel label is either contracted with `x` or an
  output feature, and the first axis of `x` (the batch to sample from) is
  an axis of `y` and not of the kernel. It may be anywhere in `y`: Gemma's
  attention projects with `'BTD,SNDH->SBTNH'`, whose first output axis is
  the stack of q, k, v.
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
      raise CaptureRefused(f'{einsum_str!r} repeats a label within an operand')
  shared = set(inputs) & set(kernel) & set(result)
  if shared:
    raise CaptureRefused(
      f'{einsum_str!r} keeps kernel labels {sorted(shared)} in the inputs'
      ' and the outputs (a batched kernel)'
    )
  summed = (set(kernel) ^ set(inputs)) - set(result)
  if summed:
    raise CaptureRefused(
      f'{einsum_str!r} sums labels {sorted(summed)} of one operand only'
    )
  if not inputs or inputs[0] not in result or inputs[0] in kernel:
    raise CaptureRefused(
      f'{einsum_str!r} does not keep the first input axis in the outputs,'
      ' so there is no batch axis to sample from'
    )
  batch = result.index(inputs[0])
  moved = inputs[0] + result[:batch] + result[batch + 1 :]  # batch first
  contracted = [c for c in kernel if c in inputs]
  outputs = [c for c in result if c in kernel]
  samples = [c for c in inputs if c in result]
  return DenseMap(
    x_perm=tuple(inputs.index(c) for c in samples + contracted),
    num_input_axes=len(contracted),
    y_perm=tuple(moved.index(c) for c in samples + outputs),
    num_output_axes=len(outputs),
    y_batch_axis=batch,
    layout=kernel_layout(
      len(contracted),
      len(outputs),
      tuple(kernel.index(c) for c in contracted + outputs),
    ),
  )


# ----------------------------------------------------------------------------
# Convolutions: the lax conv that Flax runs, with its padding made explicit.


def conv_lax_inputs(module: Any, x: jax.Array):
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
      raise CaptureRefused('CAUSAL padding is 1-D only')
    x = jnp.pad(
      x, [(0, 0), ((kernel_size[0] - 1) * kernel_dilation[0], 0), (0, 0)]
    )
    padding = 'VALID'
  if isinstance(padding, str):
    if padding not in ('SAME', 'VALID', 'SAME_LOWER'):
      raise CaptureRefused(f'padding {padding!r} is unknown')
    # lax.conv_general_dilated computes string padding on the undilated
    # input shape; do the same.
    pads = lax.padtype_to_pads(x.shape[1:-1], dilated, strides, padding)
  elif isinstance(padding, int):
    pads = [(padding, padding)] * n
  else:
    pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    if len(pads) == 1 and n > 1:
      pads = pads * n
  geometry = geometry_lib.ConvGeometry(
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
    add_perturbation: `p -> y` with `p` added to the sampled examples.
    geometry: the layer's static geometry.
    layout: how its parameters map to the row-stacked form.
  """

  inputs: jax.Array
  perturbation_shape: tuple[int, ...]
  add_perturbation: Callable[[jax.Array], jax.Array]
  geometry: geometry_lib.LayerGeometry
  layout: stats_lib.ParamLayout


def _sampled_shape(y: jax.Array, examples) -> tuple[int, ...]:
  return jax.eval_shape(lambda t: take_examples(t, examples), y).shape


def sample_dense(
  x: jax.Array, y: jax.Array, examples, dense: DenseMap
) -> Sampled:
  """A Dense-like call: inputs `(n, D_in)`, perturbation `(n, rows)`."""
  x_sampled = jnp.transpose(take_examples(x, examples), dense.x_perm)
  n_in = dense.num_input_axes
  x_sampled = x_sampled.reshape((-1, math.prod(x_sampled.shape[-n_in:])))
  b = dense.y_batch_axis
  y_sampled_shape = _sampled_shape(jnp.moveaxis(y, b, 0), examples)
  permuted = tuple(y_sampled_shape[a] for a in dense.y_perm)
  n_out = dense.num_output_axes
  p_shape = (math.prod(permuted[:-n_out]), math.prod(permuted[-n_out:]))
  inverse = tuple(np.argsort(dense.y_perm))

  def add_perturbation(p):
    # The batch axis is tapped first and moved back: a no-op on the value.
    tapped = tap_examples(
      jnp.moveaxis(y, b, 0), examples, p.reshape(permuted).transpose(inverse)
    )
    return jnp.moveaxis(tapped, 0, b)

  return Sampled(
    inputs=lax.stop_gradient(x_sampled),
    perturbation_shape=p_shape,
    add_perturbation=add_perturbation,
    geometry=geometry_lib.DenseGeometry(),
    layout=dense.layout,
  )


def sample_conv(module: Any, x: jax.Array, y: jax.Array, examples) -> Sampled:
  """A convolution: inputs `(n, *spatial, c_in)`, extra batch axes folded."""
  num_feature_dims = len(as_tuple(module.kernel_size, 1)) + 1
  if x.ndim <= num_feature_dims:
    raise CaptureRefused(f'inputs of shape {x.shape} have no batch axis')
  x_sampled = take_examples(x, examples)
  x_sampled = x_sampled.reshape((-1,) + x.shape[x.ndim - num_feature_dims :])
  x_sampled, geometry = conv_lax_inputs(module, x_sampled)
  y_sampled_shape = _sampled_shape(y, examples)
  leading = y_sampled_shape[: len(y_sampled_shape) - num_feature_dims]
  p_shape = (math.prod(leading),) + y_sampled_shape[len(leading) :]
  return Sampled(
    inputs=lax.stop_gradient(x_sampled),
    perturbation_shape=p_shape,
    add_perturbation=lambda p: tap_examples(
      y, examples, p.reshape(y_sampled_shape)
    ),
    geometry=geometry,
    layout=stats_lib.ParamLayout(),
  )
