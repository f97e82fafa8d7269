"""The layer kinds both Flax front ends capture: one table.

Each row pairs a linen class with its NNX twin and says how a call becomes
the row-stacked map (`layer_maps`): a Dense-like contraction or a
convolution. The linen interceptor and the NNX patch read only this table,
so a kind is added (or refused) once for both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx
from jax import lax

from frog_optax._src import layer_maps
from frog_optax._src import stats as stats_lib

# Why a captured layer type is refused, in both front ends.
CUSTOM_DOT_GENERAL = 'a custom dot_general is set'
CUSTOM_CONV = 'a custom conv_general_dilated is set'
CUSTOM_EINSUM = 'a custom einsum_op is set'
MASKED = 'masked kernels are not supported'
BATCHED_KERNEL = 'a batched kernel (batch_dims / batch_axis) is set'


@dataclasses.dataclass(frozen=True)
class LayerKind:
  """One captured kind of layer.

  Attributes:
    linen: the linen class.
    nnx: its NNX twin.
    dense_map: `(module, input shape, einsum_str) -> DenseMap` for a
      Dense-like layer; `None` for a convolution.
  """

  linen: type
  nnx: type
  dense_map: Callable[[Any, tuple[int, ...], Any], Any] | None


def _features(module) -> Any:
  return getattr(module, 'features', None) or module.out_features


def _einsum_kernel_shape(module) -> tuple[int, ...]:
  if isinstance(module, nnx.Einsum):
    return tuple(module.kernel.shape)
  return tuple(module.shape)


KINDS = (
  LayerKind(
    nn.Dense,
    nnx.Linear,
    lambda m, shape, _: layer_maps.dense_map(len(shape)),
  ),
  LayerKind(
    nn.DenseGeneral,
    nnx.LinearGeneral,
    lambda m, shape, _: layer_maps.dense_general_map(
      len(shape),
      layer_maps.as_tuple(m.axis, 1),
      len(layer_maps.as_tuple(_features(m), 1)),
    ),
  ),
  LayerKind(
    nn.Einsum,
    nnx.Einsum,
    # The equation may also be given at call time.
    lambda m, shape, einsum_str: layer_maps.einsum_map(
      (einsum_str or m.einsum_str).replace(' ', ''),
      shape,
      _einsum_kernel_shape(m),
    ),
  ),
  LayerKind(nn.Conv, nnx.Conv, None),
)
LINEN_TYPES = tuple(kind.linen for kind in KINDS)
NNX_TYPES = tuple(kind.nnx for kind in KINDS)


def kind_of(module: Any) -> LayerKind | None:
  """The module's row of the table (its class or a subclass), or None."""
  for kind in KINDS:
    if isinstance(module, (kind.linen, kind.nnx)):
      return kind
  return None


def refusal(module: Any) -> str | None:
  """Why the maps do not model this configuration of a captured kind."""
  kind = kind_of(module)
  if kind.dense_map is None:
    custom = getattr(module, 'conv_general_dilated_cls', None) is not None
    conv = getattr(module, 'conv_general_dilated', None)
    if custom or conv not in (None, lax.conv_general_dilated):
      return CUSTOM_CONV
    return MASKED if module.mask is not None else None
  if getattr(module, 'einsum_op', jnp.einsum) is not jnp.einsum:
    return CUSTOM_EINSUM
  custom = getattr(module, 'dot_general_cls', None) is not None
  if custom or getattr(module, 'dot_general', None) not in (
    None,
    lax.dot_general,
  ):
    return CUSTOM_DOT_GENERAL
  if getattr(module, 'batch_dims', ()) or getattr(module, 'batch_axis', None):
    return BATCHED_KERNEL
  return None


def sample(module, x, y, examples, einsum_str=None) -> layer_maps.Sampled:
  """What one call of a captured layer contributes, or `CaptureRefused`."""
  why = refusal(module)
  if why:
    raise stats_lib.CaptureRefused(why)
  kind = kind_of(module)
  if kind.dense_map is None:
    return layer_maps.sample_conv(module, x, y, examples)
  dense = kind.dense_map(module, x.shape, einsum_str)
  return layer_maps.sample_dense(x, y, examples, dense)
