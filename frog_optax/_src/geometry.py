"""The static geometry of a captured layer, and its linear map.

A geometry knows how one layer maps row-stacked weights `V = {'kernel',
'bias'?}` to the outputs of given inputs, `X(V)`, and back, `Xᵀ(·)`; what
each row sees (its patches and their squared norms); and which stats shapes
fit a kernel. Every kind of layer answers the same methods, so the Fisher
code never asks which kind it holds.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# A module's parameters in the row-stacked form: {'kernel': (..., rows),
# 'bias'?: (rows,)}. The one definition; the other modules import it.
RowParams = dict[str, jax.Array]


def _add_bias(outputs: jax.Array, params: RowParams) -> jax.Array:
  return outputs + params['bias'] if 'bias' in params else outputs


def _with_bias_column(patches: jax.Array, has_bias: bool) -> jax.Array:
  if not has_bias:
    return patches
  ones = jnp.ones(patches.shape[:-1] + (1,), patches.dtype)
  return jnp.concatenate([patches, ones], axis=-1)


@dataclasses.dataclass(frozen=True)
class DenseGeometry:
  """A Dense layer: `outputs = inputs @ kernel (+ bias)` on the last axis."""

  @property
  def sample_ndim(self) -> int:
    """Axes of one layer's inputs: `(samples, features)`."""
    return 2

  def forward(self, inputs: jax.Array, params: RowParams) -> jax.Array:
    """`X(V)`: the outputs on `inputs` for weights `V` (all rows)."""
    return _add_bias(inputs @ params['kernel'], params)

  def transpose(
    self, inputs: jax.Array, params_like: RowParams
  ) -> Callable[[jax.Array], RowParams]:
    """`Xᵀ(·)`: maps output cotangents back to row-stacked weights."""

    def dense_transpose(cotangent):
      out = {'kernel': inputs.T @ cotangent}
      if 'bias' in params_like:
        out['bias'] = cotangent.sum(axis=0)
      return out

    return dense_transpose

  def patch_sq_norms(
    self, inputs: jax.Array, kernel_shape: tuple[int, ...], has_bias: bool
  ) -> jax.Array:
    """‖x_n‖² (+1 for the bias coordinate), shape `(n, 1)`."""
    del kernel_shape
    norms = jnp.square(inputs).sum(axis=-1, keepdims=True)
    return norms + 1.0 if has_bias else norms

  def patches(
    self, inputs: jax.Array, kernel_shape: tuple[int, ...], has_bias: bool
  ) -> jax.Array:
    """The explicit design matrix, `(1, n, D)` (one group)."""
    del kernel_shape
    return _with_bias_column(inputs.reshape(1, -1, inputs.shape[-1]), has_bias)

  def kernel_mismatch(
    self, input_shape: tuple[int, ...], kernel_shape: tuple[int, ...]
  ) -> str | None:
    """Why one layer's inputs do not fit a row-stacked kernel, or None."""
    if len(kernel_shape) != 2 or len(input_shape) != 2:
      return 'they are stats of a Dense layer and the kernel is not one'
    if input_shape[-1] != kernel_shape[-2]:
      return (
        f'their inputs have {input_shape[-1]} features, the kernel expects'
        f' {kernel_shape[-2]}'
      )
    return None


def conv_dimension_numbers(num_spatial_dims: int) -> lax.ConvDimensionNumbers:
  """Channels-last numbers: inputs NHWC, kernel HWIO, outputs NHWC."""
  n = num_spatial_dims
  spatial = tuple(range(1, n + 1))
  return lax.ConvDimensionNumbers(
    lhs_spec=(0, n + 1) + spatial,
    rhs_spec=(n + 1, n) + tuple(range(n)),
    out_spec=(0, n + 1) + spatial,
  )


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
  """A channels-last convolution, as `lax.conv_general_dilated` runs it.

  Padding is always explicit `(low, high)` pairs: circular, reflect and causal
  padding are applied to the captured inputs, which then need none.
  """

  strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]
  feature_group_count: int

  @property
  def num_spatial_dims(self) -> int:
    return len(self.strides)

  @property
  def sample_ndim(self) -> int:
    """Axes of one layer's inputs: `(samples, *spatial, channels)`."""
    return self.num_spatial_dims + 2

  def conv(self, inputs: jax.Array, kernel: jax.Array) -> jax.Array:
    """The layer's convolution of `inputs` with `kernel`, no bias."""
    return lax.conv_general_dilated(
      inputs,
      kernel,
      window_strides=self.strides,
      padding=self.padding,
      lhs_dilation=self.input_dilation,
      rhs_dilation=self.kernel_dilation,
      dimension_numbers=conv_dimension_numbers(self.num_spatial_dims),
      feature_group_count=self.feature_group_count,
    )

  def forward(self, inputs: jax.Array, params: RowParams) -> jax.Array:
    """`X(V)`: the outputs on `inputs` for weights `V` (all rows)."""
    return _add_bias(self.conv(inputs, params['kernel']), params)

  def transpose(
    self, inputs: jax.Array, params_like: RowParams
  ) -> Callable[[jax.Array], RowParams]:
    """`Xᵀ(·)`: the weight-gradient convolution of output cotangents."""
    transpose = jax.linear_transpose(
      lambda p: self.forward(inputs, p), params_like
    )
    return lambda cotangent: transpose(cotangent)[0]

  def patch_sq_norms(
    self, inputs: jax.Array, kernel_shape: tuple[int, ...], has_bias: bool
  ) -> jax.Array:
    """‖x_{n,t}‖² (+1 for the bias) of the patch each row sees.

    Shape `(n, *out_spatial, 1 or rows)`: rows of one feature group see the
    same patch. A windowed sum (with the layer's strides, padding and
    dilations) of the squared inputs summed over each group's channels: the
    same numbers as an all-ones convolution with one output channel per
    group, which convolution libraries run poorly.
    """
    groups = self.feature_group_count
    sq = jnp.square(inputs)
    sq = sq.reshape(sq.shape[:-1] + (groups, -1)).sum(axis=-1)
    window = tuple(kernel_shape[:-2])
    norms = lax.reduce_window(
      sq,
      jnp.zeros((), sq.dtype),
      lax.add,
      window_dimensions=(1, *window, 1),
      window_strides=(1, *self.strides, 1),
      padding=((0, 0), *self.padding, (0, 0)),
      base_dilation=(1, *self.input_dilation, 1),
      window_dilation=(1, *self.kernel_dilation, 1),
    )
    if groups > 1:
      norms = jnp.repeat(norms, kernel_shape[-1] // groups, axis=-1)
    return norms + 1.0 if has_bias else norms

  def patches(
    self, inputs: jax.Array, kernel_shape: tuple[int, ...], has_bias: bool
  ) -> jax.Array:
    """The explicit design matrix of each feature group, `(groups, n·t, D)`.

    A convolution with an identity kernel extracts the patches, so strides,
    padding and dilation are the layer's own.
    """
    groups = self.feature_group_count
    row_size = int(np.prod(kernel_shape[:-1]))
    eye = jnp.eye(row_size, dtype=inputs.dtype).reshape(
      tuple(kernel_shape[:-1]) + (row_size,)
    )
    # Block g of the output channels sees the input channels of group g.
    out = self.conv(inputs, jnp.tile(eye, (1,) * (eye.ndim - 1) + (groups,)))
    patches = jnp.moveaxis(out.reshape(-1, groups, row_size), 1, 0)
    return _with_bias_column(patches, has_bias)

  def kernel_mismatch(
    self, input_shape: tuple[int, ...], kernel_shape: tuple[int, ...]
  ) -> str | None:
    """Why one layer's inputs do not fit a row-stacked kernel, or None."""
    ndim = self.sample_ndim
    if len(kernel_shape) != ndim or len(input_shape) != ndim:
      return (
        f'they are stats of a {self.num_spatial_dims}-D convolution'
        f' and the kernel has {len(kernel_shape)} axes'
      )
    groups = self.feature_group_count
    if (
      input_shape[-1] != kernel_shape[-2] * groups or kernel_shape[-1] % groups
    ):
      return (
        f'their inputs have {input_shape[-1]} channels, the kernel expects'
        f' {kernel_shape[-2]} per group × {groups} groups'
      )
    return None


LayerGeometry = DenseGeometry | ConvGeometry
