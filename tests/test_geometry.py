"""Geometry methods against explicit im2col (NumPy, float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import frog_optax as fo

import explicit

# (input shape, kernel spatial, strides, padding, input dil., kernel dil.,
#  groups)
CONVS = {
  'same_3x3': (
    (2, 6, 5, 4),
    (3, 3),
    (1, 1),
    ((1, 1), (1, 1)),
    (1, 1),
    (1, 1),
    1,
  ),
  'strided_asym': (
    (2, 7, 6, 4),
    (3, 2),
    (2, 3),
    ((2, 0), (0, 1)),
    (1, 1),
    (1, 1),
    1,
  ),
  'dilated_grouped': (
    (3, 9, 8, 6),
    (2, 3),
    (1, 2),
    ((1, 2), (2, 1)),
    (2, 1),
    (2, 2),
    3,
  ),
  '1d_causal': ((2, 11, 4), (4,), (1,), ((3, 0),), (1,), (2,), 2),
}


@pytest.mark.parametrize('name', sorted(CONVS))
@pytest.mark.parametrize('has_bias', [False, True])
def test_conv_patch_sq_norms_match_explicit_im2col(name, has_bias):
  shape, window, strides, padding, in_dil, k_dil, groups = CONVS[name]
  geometry = fo.ConvGeometry(strides, padding, in_dil, k_dil, groups)
  x = np.random.default_rng(0).normal(size=shape)
  rows = 2 * groups
  kernel_shape = (*window, shape[-1] // groups, rows)
  got = geometry.patch_sq_norms(jnp.asarray(x), kernel_shape, has_bias)
  patches = explicit.conv_patches(x, window, strides, padding, in_dil, k_dil)
  # (n, *out, *window, c_in) -> squared norm over each group's channels.
  sq = np.square(patches).reshape(patches.shape[: 1 + len(window)] + (-1,))
  per_channel = sq.reshape(sq.shape[:-1] + (-1, shape[-1])).sum(axis=-2)
  per_group = per_channel.reshape(per_channel.shape[:-1] + (groups, -1))
  want = np.repeat(per_group.sum(axis=-1), rows // groups, axis=-1)
  # One column per group, or one per row: rows of a group share a patch.
  got = np.broadcast_to(got, want.shape)
  np.testing.assert_allclose(got, want + float(has_bias), rtol=1e-12)
  # A windowed sum, not an all-ones convolution with one output per group.
  jaxpr = jax.make_jaxpr(
    lambda x: geometry.patch_sq_norms(x, kernel_shape, has_bias)
  )(jnp.asarray(x))
  assert 'conv_general_dilated' not in str(jaxpr)
