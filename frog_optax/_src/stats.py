"""Captured layer statistics and the static layer geometry they carry.

A `LayerStats` is what the capture hands to the optimizer for one layer: the
inputs and output gradients of the sampled examples, plus the static geometry
needed to rebuild the layer's linear map. It is a pytree (it crosses `jit`
boundaries as arrays), the geometry is static aux data.
"""

import dataclasses
import math
from typing import Any

import jax

from frog_optax._src.geometry import LayerGeometry


@dataclasses.dataclass(frozen=True)
class ParamLayout:
  """How a module's `{'kernel', 'bias'}` map to the row-stacked form.

  The row-stacked form is what the optimizers work on: a kernel whose last
  axis is the rows (output features) and a `(rows,)` bias, as `nn.Dense` and
  `nn.Conv` store them. `DenseGeneral` and `Einsum` kernels have several
  input or output axes (and `Einsum` any axis order); `nn.scan` stacks every
  parameter along leading layer axes.

  Attributes:
    stacked_axes: leading layer axes (from `nn.scan`) of the parameters and
      of the stats; each layer is preconditioned on its own.
    num_input_axes: `None` when the kernel is already row-stacked (Dense,
      Conv); else the kernel, after `kernel_perm`, is `(*inputs, *outputs)`
      with this many input axes, and is flattened to `(D_in, rows)`.
    kernel_perm: axis order (after the stacked axes) that brings the kernel
      to `(*inputs, *outputs)` (or, with `num_input_axes=None`, to the
      channels-last `(*window, c_in, rows)` of a convolution, e.g. from an
      Equinox `(rows, c_in, *window)` weight); `None` when it already is.
    bias_path: for a layer whose parameters are not a `{'kernel', 'bias'}`
      module dict (captured by :func:`frog_optax.jax.value_and_grad`, where
      the stats sit at the kernel's own leaf), the '/'-joined path of its
      bias leaf; `None` for no bias.
  """

  stacked_axes: int = 0
  num_input_axes: int | None = None
  kernel_perm: tuple[int, ...] | None = None
  bias_path: str | None = None


@dataclasses.dataclass(frozen=True)
class LayerStats:
  """Inputs and output gradients of one layer on the Fisher sample.

  Attributes:
    inputs: layer inputs of the sampled examples. Dense: `(n, d_in)` with all
      leading axes folded into `n`; Conv: `(n, *spatial, c_in)`, already
      padded when the layer pads by circular, reflect or causal rules.
    output_grads: dLoss/d(outputs) of the same examples, `(n, d_out)` or
      `(n, *out_spatial, c_out)`, multiplied by the total batch size of the
      layer's calls (one factor for all of them) so that a mean-reduced loss
      does not shrink them.
    geometry: static description of the layer's linear map.
    layout: static description of how the module's parameters map to the
      row-stacked form; with `layout.stacked_axes = k`, `inputs` and
      `output_grads` have the same `k` leading layer axes as the parameters.
  """

  inputs: jax.Array
  output_grads: jax.Array
  geometry: LayerGeometry = dataclasses.field(metadata={'static': True})
  layout: ParamLayout = dataclasses.field(
    default=ParamLayout(), metadata={'static': True}
  )

  @property
  def num_samples(self) -> int:
    """(example, location) pairs behind each row's Fisher: its rank bound."""
    return math.prod(self.output_grads.shape[self.layout.stacked_axes : -1])


jax.tree_util.register_dataclass(
  LayerStats,
  data_fields=['inputs', 'output_grads'],
  meta_fields=['geometry', 'layout'],
)


# The reasons a layer is not captured that are not about its configuration.
UNKNOWN_TYPE = 'the capture does not know this layer type'
EXCLUDED = 'excluded from the capture (value_and_grad(exclude=...))'


@dataclasses.dataclass(frozen=True)
class UncapturedLayer:
  """A stats-tree entry: a module with a kernel the capture did not capture.

  Put in place of the module's parameters (like `None`, it holds no arrays),
  so that an optimizer asked to precondition it can say which layer it is
  and why, and :func:`frog_optax.describe` can show it. The optimizers send
  such a layer to the fallback when their `exclude` names it, and raise an
  error naming it otherwise.

  Attributes:
    layer_type: the module's class name, e.g. `'ConvLocal'`.
    reason: why it was not captured, e.g. that the capture does not know
      the layer type, or that an Einsum has no batch axis to sample from.
  """

  layer_type: str
  reason: str = UNKNOWN_TYPE


jax.tree_util.register_dataclass(
  UncapturedLayer, data_fields=[], meta_fields=['layer_type', 'reason']
)


class CaptureRefused(Exception):
  """Inside the capture: this call of a layer cannot be sampled, and why.

  Raised by the layer maps and caught by the capture, which records the
  layer as an :class:`UncapturedLayer` with `why` as its reason.
  """

  def __init__(self, why: str):
    super().__init__(why)
    self.why = why


def is_stats_leaf(x: Any) -> bool:
  return x is None or isinstance(x, (LayerStats, UncapturedLayer))
