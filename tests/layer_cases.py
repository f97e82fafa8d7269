"""Small layers with explicit per-row design matrices, shared by the tests."""

import jax
import jax.numpy as jnp
import numpy as np

import frog_optax as fo

import explicit

DAMPING = 1e-3

# (name, input shape, kernel shape, strides, padding, input dil, kernel dil,
#  groups); `None` strides mean a Dense layer.
LAYERS = [
  ('dense', (6, 5), (5, 3), None, None, None, None, 1),
  ('conv1d_stride_pad', (3, 9, 2), (3, 2, 4), (2,), ((1, 1),), (1,), (1,), 1),
  (
    'conv2d_groups_dilation',
    (2, 6, 5, 4),
    (2, 3, 2, 6),
    (2, 1),
    ((1, 0), (2, 1)),
    (1, 1),
    (1, 2),
    2,
  ),
  (
    'conv2d_input_dilation',
    (2, 4, 4, 3),
    (3, 3, 3, 2),
    (1, 2),
    ((1, 1), (1, 1)),
    (2, 1),
    (1, 1),
    1,
  ),
  (
    'conv2d_depthwise',
    (2, 5, 5, 3),
    (3, 3, 1, 6),
    (1, 1),
    ((1, 1), (1, 1)),
    (1, 1),
    (1, 1),
    3,
  ),
  (
    'conv3d',
    (2, 4, 3, 3, 2),
    (2, 2, 2, 2, 3),
    (1, 1, 1),
    ((0, 0), (1, 0), (0, 1)),
    (1, 1, 1),
    (1, 1, 1),
    1,
  ),
]


def make_layer(spec, has_bias, seed=0):
  _, x_shape, k_shape, strides, padding, in_dil, k_dil, groups = spec
  rng = np.random.default_rng(seed)
  x = rng.normal(size=x_shape)
  kernel = rng.normal(size=k_shape)
  params = {'kernel': jnp.asarray(kernel)}
  if has_bias:
    params['bias'] = jnp.asarray(rng.normal(size=k_shape[-1]))
  if strides is None:
    geometry = fo.DenseGeometry()
    features = np.stack([x] * k_shape[-1])
    if has_bias:
      features = np.concatenate(
        [features, np.ones(features.shape[:2] + (1,))], axis=-1
      )
  else:
    geometry = fo.ConvGeometry(strides, padding, in_dil, k_dil, groups)
    patches = explicit.conv_patches(
      x, k_shape[:-2], strides, padding, in_dil, k_dil
    )
    features = explicit.row_feature_matrices(
      patches, k_shape[-1], groups, has_bias
    )
  outputs = geometry.forward(jnp.asarray(x), params)
  dy = rng.normal(size=outputs.shape)
  stats = fo.LayerStats(jnp.asarray(x), jnp.asarray(dy), geometry)
  return stats, params, features


def dense_matrix(linear_fn, kernel_shape, has_bias):
  """The matrix of a linear map on row-stacked weights, column by column."""
  rows = kernel_shape[-1]
  d = int(np.prod(kernel_shape[:-1])) + has_bias
  basis = np.eye(rows * d).reshape(rows * d, rows, d)

  def column(e):
    v = explicit.vectors_to_rows(e, kernel_shape, has_bias)
    out = linear_fn(v)
    cols = [out['kernel'].reshape(-1, rows).T]
    if has_bias:
      cols.append(out['bias'][:, None])
    return jnp.concatenate(cols, axis=1).reshape(-1)

  return np.asarray(jax.vmap(column)(basis)).T
