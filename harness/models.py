"""A small conv net: conv-BN-relu blocks and a linear head."""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class ConvNet(nn.Module):
  """`len(features)` conv-BN-relu blocks, then a Dense head.

  Works on images `(B, H, W, C)` and signals `(B, L, C)`: the kernel rank
  follows the input. Blocks after the first downsample by 2.
  """

  features: Sequence[int] = (32, 64, 64)
  num_classes: int = 10
  pool: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    spatial = x.ndim - 2
    for i, width in enumerate(self.features):
      x = nn.Conv(
        width,
        (3,) * spatial,
        strides=1 if i == 0 else 2,
        use_bias=False,
        dtype=self.dtype,
        name=f'conv{i}',
      )(x)
      # momentum 0.9, not Flax's 0.99: runs here are a few hundred steps,
      # and evaluation uses the running statistics.
      x = nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        dtype=self.dtype,
        name=f'bn{i}',
      )(x)
      x = nn.relu(x)
    if self.pool:
      x = x.mean(axis=tuple(range(1, 1 + spatial)))
    else:
      x = x.reshape(len(x), -1)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
