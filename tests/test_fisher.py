"""The row-wise Fisher operator against explicit per-row matrices (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import frog_optax as fo
from frog_optax._src import fisher

import explicit
from layer_cases import DAMPING
from layer_cases import LAYERS
from layer_cases import dense_matrix
from layer_cases import make_layer


@pytest.mark.parametrize('has_bias', [False, True], ids=['nobias', 'bias'])
@pytest.mark.parametrize('spec', LAYERS, ids=[s[0] for s in LAYERS])
class TestRowFisherOperator:
  def test_forward_map_matches_explicit_patches(self, spec, has_bias):
    stats, params, features = make_layer(spec, has_bias)
    rows = explicit.rows_to_vectors(params['kernel'], params.get('bias'))
    want = np.einsum('jnd,jd->nj', features, rows)
    got = stats.geometry.forward(stats.inputs, params)
    np.testing.assert_allclose(
      np.asarray(got).reshape(-1, rows.shape[0]), want, rtol=1e-10, atol=1e-10
    )

  def test_operator_equals_explicit_block_diagonal(self, spec, has_bias):
    stats, params, features = make_layer(spec, has_bias)
    op = fo.row_fisher_operator(stats, params, DAMPING, jnp.float64)
    got = dense_matrix(op, params['kernel'].shape, has_bias)
    blocks = explicit.normalized_row_fishers(
      features, stats.output_grads, DAMPING
    )
    rows, d, _ = blocks.shape
    want = np.zeros((rows * d, rows * d))
    for j in range(rows):
      want[j * d : (j + 1) * d, j * d : (j + 1) * d] = blocks[j]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)

  def test_transpose_is_adjoint_of_forward(self, spec, has_bias):
    stats, params, _ = make_layer(spec, has_bias)
    rng = np.random.default_rng(1)
    v = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
    out = stats.geometry.forward(stats.inputs, v)
    w = jnp.asarray(rng.normal(size=out.shape))
    transpose = stats.geometry.transpose(stats.inputs, params)
    lhs = float(jnp.vdot(out, w))
    rhs = sum(
      float(jnp.vdot(a, b))
      for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(transpose(w)))
    )
    np.testing.assert_allclose(lhs, rhs, rtol=1e-10)

  def test_patches_are_each_groups_design_matrix(self, spec, has_bias):
    stats, params, features = make_layer(spec, has_bias)
    patches = stats.geometry.patches(
      stats.inputs, params['kernel'].shape, has_bias
    )
    groups = patches.shape[0]
    rows_per_group = features.shape[0] // groups
    for j in range(features.shape[0]):
      np.testing.assert_allclose(
        patches[j // rows_per_group], features[j], rtol=1e-12, atol=1e-12
      )

  def test_diagonals_of_input_and_output_second_moments(self, spec, has_bias):
    stats, params, features = make_layer(spec, has_bias)
    got = fisher.input_sq_sums(stats, params, jnp.float64)
    want = np.stack([np.diag(f.T @ f) for f in features])
    rows = explicit.rows_to_vectors(got['kernel'], got.get('bias'))
    np.testing.assert_allclose(rows, want, rtol=1e-10)
    dy = np.asarray(stats.output_grads).reshape(-1, features.shape[0])
    np.testing.assert_allclose(
      fisher.output_sq_sums(stats, jnp.float64), (dy**2).sum(0), rtol=1e-12
    )


def test_operator_is_invariant_to_output_grad_scale():
  stats, params, _ = make_layer(LAYERS[2], True)
  scaled = fo.LayerStats(stats.inputs, 1e4 * stats.output_grads, stats.geometry)
  a = dense_matrix(
    fo.row_fisher_operator(stats, params, DAMPING, jnp.float64),
    params['kernel'].shape,
    True,
  )
  b = dense_matrix(
    fo.row_fisher_operator(scaled, params, DAMPING, jnp.float64),
    params['kernel'].shape,
    True,
  )
  np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_zero_statistics_give_identity_rows():
  """A row without curvature gets the mean eigenvalue (1) plus damping."""
  stats, params, _ = make_layer(LAYERS[1], True)
  zero = fo.LayerStats(
    jnp.zeros_like(stats.inputs),
    jnp.zeros_like(stats.output_grads),
    stats.geometry,
  )
  got = dense_matrix(
    fo.row_fisher_operator(zero, params, DAMPING, jnp.float64),
    params['kernel'].shape,
    True,
  )
  assert np.all(np.isfinite(got))
  want = (1.0 + DAMPING) * np.eye(got.shape[0])
  np.testing.assert_allclose(got, want, atol=1e-15)
