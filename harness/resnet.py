"""ResNet-18, CIFAR variant (He et al. 2016, as in the original FROG notebook).

A 3x3 stride-1 stem and no max-pool (32x32 inputs keep their resolution into
the first stage), four stages of two basic blocks (64, 128, 256, 512
channels, stride 2 from the second stage on, 1x1 projection shortcuts where
the shape changes), BatchNorm after every convolution, global average pool
and a linear head.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers and a residual connection."""

  features: int
  strides: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = lambda name: nn.BatchNorm(
      use_running_average=not train, dtype=self.dtype, name=name
    )
    conv = lambda kernel, strides, name: nn.Conv(
      self.features,
      (kernel, kernel),
      strides=strides,
      use_bias=False,
      dtype=self.dtype,
      name=name,
    )
    y = nn.relu(norm('bn1')(conv(3, self.strides, 'conv1')(x)))
    y = norm('bn2')(conv(3, 1, 'conv2')(y))
    if x.shape != y.shape:
      x = norm('shortcut_bn')(conv(1, self.strides, 'shortcut')(x))
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """CIFAR ResNet-18: about 11.2M parameters for 10 classes.

  Example:
    >>> import jax
    >>> model = ResNet18(num_classes=10)
    >>> x = jax.ShapeDtypeStruct((2, 32, 32, 3), 'float32')
    >>> shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    >>> round(sum(p.size for p in jax.tree.leaves(shapes['params'])) / 1e6, 1)
    11.2
  """

  num_classes: int = 10
  stage_features: Sequence[int] = (64, 128, 256, 512)
  blocks_per_stage: int = 2
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(
      self.stage_features[0],
      (3, 3),
      use_bias=False,
      dtype=self.dtype,
      name='stem',
    )(x)
    x = nn.BatchNorm(
      use_running_average=not train, dtype=self.dtype, name='stem_bn'
    )(x)
    x = nn.relu(x)
    for i, features in enumerate(self.stage_features):
      for j in range(self.blocks_per_stage):
        x = BasicBlock(
          features,
          strides=2 if i > 0 and j == 0 else 1,
          dtype=self.dtype,
          name=f'stage{i + 1}_block{j + 1}',
        )(x, train)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)


class ResNet20(ResNet18):
  """CIFAR ResNet-20 (He et al. 2016, section 4.2): about 0.27M parameters.

  Three stages of three basic blocks (16, 32, 64 channels), the same stem,
  BatchNorm and 1x1 projection shortcuts as :class:`ResNet18`.

  Example:
    >>> import jax
    >>> model = ResNet20(num_classes=10)
    >>> x = jax.numpy.zeros((2, 28, 28, 1))
    >>> variables = model.init(jax.random.key(0), x)
    >>> model.apply(variables, x, train=False).shape
    (2, 10)
  """

  stage_features: Sequence[int] = (16, 32, 64)
  blocks_per_stage: int = 3
