"""Per-layer linear maps and the row-wise, trace-normalised Fisher operator.

For one layer, `X(V)` maps row-stacked weights `V = {'kernel', 'bias'}` to the
pre-activation outputs of the sampled examples, and `Xᵀ(G)` is its transpose
(for a convolution: the weight-gradient convolution). All rows share `X`, so

  A(V) = Xᵀ(Λ̂ ⊙ X(V)) + τ V,
  Λ̂[..., j] = y_j² · D / Σ_{n,t} y²_{n,t,j} ‖x_{n,t}‖²

applies every row's damped, trace-normalised Fisher `F_j / (tr F_j / D) + τ I`
in one forward and one transposed layer op (ALGORITHM.md §2-3).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from frog_optax._src import stats as stats_lib

RowParams = dict[str, jax.Array]  # {'kernel': (..., rows), 'bias'?: (rows,)}


def conv_dimension_numbers(num_spatial_dims: int) -> lax.ConvDimensionNumbers:
  """Channels-last numbers: inputs NHWC, kernel HWIO, outputs NHWC."""
  n = num_spatial_dims
  spatial = tuple(range(1, n + 1))
  return lax.ConvDimensionNumbers(
    lhs_spec=(0, n + 1) + spatial,
    rhs_spec=(n + 1, n) + tuple(range(n)),
    out_spec=(0, n + 1) + spatial,
  )


def _conv(geometry: stats_lib.ConvGeometry, x, kernel):
  return lax.conv_general_dilated(
    x,
    kernel,
    window_strides=geometry.strides,
    padding=geometry.padding,
    lhs_dilation=geometry.input_dilation,
    rhs_dilation=geometry.kernel_dilation,
    dimension_numbers=conv_dimension_numbers(geometry.num_spatial_dims),
    feature_group_count=geometry.feature_group_count,
  )


def layer_forward(
  geometry: stats_lib.LayerGeometry, inputs: jax.Array, params: RowParams
) -> jax.Array:
  """`X(V)`: the layer's outputs on `inputs` for weights `V` (all rows)."""
  if isinstance(geometry, stats_lib.DenseGeometry):
    outputs = inputs @ params['kernel']
  else:
    outputs = _conv(geometry, inputs, params['kernel'])
  if 'bias' in params:
    outputs = outputs + params['bias']
  return outputs


def layer_transpose(
  geometry: stats_lib.LayerGeometry,
  inputs: jax.Array,
  params_like: RowParams,
) -> Callable[[jax.Array], RowParams]:
  """`Xᵀ(·)`: maps output cotangents back to row-stacked weights."""
  if isinstance(geometry, stats_lib.DenseGeometry):

    def dense_transpose(cotangent):
      out = {'kernel': inputs.T @ cotangent}
      if 'bias' in params_like:
        out['bias'] = cotangent.sum(axis=0)
      return out

    return dense_transpose

  forward = lambda p: layer_forward(geometry, inputs, p)
  transpose = jax.linear_transpose(forward, params_like)
  return lambda cotangent: transpose(cotangent)[0]


def patch_sq_norms(
  geometry: stats_lib.LayerGeometry,
  inputs: jax.Array,
  kernel_shape: tuple[int, ...],
  has_bias: bool,
) -> jax.Array:
  """‖x_{n,t}‖² (+1 for the bias coordinate) of the patch each row sees.

  Returns an array that broadcasts against the layer outputs: `(n, 1)` for
  Dense; `(n, *out_spatial, 1 or rows)` for Conv (rows of one feature group
  see the same patch, so one all-ones convolution per group suffices).
  """
  sq = jnp.square(inputs)
  if isinstance(geometry, stats_lib.DenseGeometry):
    norms = sq.sum(axis=-1, keepdims=True)
  else:
    groups = geometry.feature_group_count
    window = tuple(kernel_shape[:-2])
    ones = jnp.ones(window + (kernel_shape[-2], groups), sq.dtype)
    norms = _conv(geometry, sq, ones)
    if groups > 1:
      norms = jnp.repeat(norms, kernel_shape[-1] // groups, axis=-1)
  return norms + 1.0 if has_bias else norms


def row_inner(a: RowParams, b: RowParams) -> jax.Array:
  """Per-row inner products `⟨a_j, b_j⟩`: sums over all axes but the last."""
  total = 0.0
  for name in a:
    prod = a[name] * b[name]
    total = total + prod.reshape(-1, prod.shape[-1]).sum(axis=0)
  return total


def row_dimension(params: RowParams) -> int:
  """D: entries of one row, the bias counted as a homogeneous coordinate."""
  return int(np.prod(params['kernel'].shape[:-1])) + ('bias' in params)


def row_fisher_operator(
  layer_stats: stats_lib.LayerStats,
  params_like: RowParams,
  damping: Any,
  dtype: Any,
) -> Callable[[RowParams], RowParams]:
  """The damped, trace-normalised row-wise Fisher `A(V)` of one layer.

  Args:
    layer_stats: captured inputs and output gradients of the layer.
    params_like: the layer's `{'kernel', 'bias'?}` (shapes only are used).
    damping: τ, relative to the mean Fisher eigenvalue (a scalar).
    dtype: the solve dtype; statistics are cast to it.

  Returns:
    A linear function on `{'kernel', 'bias'?}` dicts of the same shapes.
  """
  geometry = layer_stats.geometry
  inputs = layer_stats.inputs.astype(dtype)
  output_grads = layer_stats.output_grads.astype(dtype)
  kernel_shape = params_like['kernel'].shape
  has_bias = 'bias' in params_like
  num_rows = kernel_shape[-1]
  params_struct = {
    k: jax.ShapeDtypeStruct(v.shape, dtype) for k, v in params_like.items()
  }
  dy_sq = jnp.square(output_grads)
  norms = patch_sq_norms(geometry, inputs, kernel_shape, has_bias)
  weighted = (dy_sq * norms).reshape(-1, num_rows).sum(axis=0)
  # tr(F_j)/D up to the common 1/s, which cancels in Λ̂.
  trace_per_dim = weighted / row_dimension(params_like)
  tiny = jnp.finfo(dtype).tiny
  curvature = dy_sq / jnp.maximum(trace_per_dim, tiny)
  transpose = layer_transpose(geometry, inputs, params_struct)

  def matvec(v: RowParams) -> RowParams:
    fisher_v = transpose(curvature * layer_forward(geometry, inputs, v))
    return {k: fisher_v[k] + damping * v[k] for k in v}

  return matvec
