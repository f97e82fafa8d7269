"""Batched CG against textbook CG and `jnp.linalg.solve` (float64)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import frog_optax as fo
from frog_optax._src import fisher

import explicit
from layer_cases import LAYERS
from layer_cases import make_layer

ROWS, D = 5, 7


def spd_blocks(seed, rows=ROWS, d=D, cond=50.0):
  rng = np.random.default_rng(seed)
  mats = []
  for _ in range(rows):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mats.append(q @ np.diag(np.geomspace(1.0, cond, d)) @ q.T)
  return np.stack(mats)


def block_matvec(blocks):
  a = jnp.asarray(blocks)
  # Rows on the last axis, as FROG stores them: v['kernel'] is (D, rows).
  return lambda v: {'kernel': jnp.einsum('jde,ej->dj', a, v['kernel'])}


class BatchedCGTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_k_steps_equal_textbook_cg(self):
    blocks = spd_blocks(0)
    b = np.random.default_rng(1).normal(size=(D, ROWS))
    for k in (1, 2, 4):
      solve = self.variant(
        lambda rhs, k=k: fo.batched_cg(
          block_matvec(blocks), rhs, k, fisher.row_inner
        )
      )
      got = solve({'kernel': jnp.asarray(b)})['kernel']
      want = np.stack(
        [explicit.textbook_cg(blocks[j], b[:, j], k) for j in range(ROWS)],
        axis=1,
      )
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)

  @chex.variants(with_jit=True, without_jit=True)
  def test_a_start_equals_textbook_cg_from_it(self):
    blocks = spd_blocks(4)
    rng = np.random.default_rng(5)
    b, x0 = rng.normal(size=(D, ROWS)), rng.normal(size=(D, ROWS))
    solve = self.variant(
      lambda rhs, start: fo.batched_cg(
        block_matvec(blocks), rhs, 2, fisher.row_inner, init=start
      )
    )
    got = solve({'kernel': jnp.asarray(b)}, {'kernel': jnp.asarray(x0)})
    want = np.stack(
      [
        explicit.textbook_cg(blocks[j], b[:, j], 2, x0[:, j])
        for j in range(ROWS)
      ],
      axis=1,
    )
    np.testing.assert_allclose(got['kernel'], want, rtol=1e-10, atol=1e-12)
    # Started at the solution, CG stays there.
    exact = np.stack(
      [np.linalg.solve(blocks[j], b[:, j]) for j in range(ROWS)], axis=1
    )
    stay = solve({'kernel': jnp.asarray(b)}, {'kernel': jnp.asarray(exact)})
    np.testing.assert_allclose(stay['kernel'], exact, rtol=1e-9, atol=1e-12)

  @chex.variants(with_jit=True, without_jit=True)
  def test_d_steps_solve_exactly(self):
    blocks = spd_blocks(2, cond=10.0)
    b = np.random.default_rng(3).normal(size=(D, ROWS))
    got = self.variant(
      lambda rhs: fo.batched_cg(block_matvec(blocks), rhs, D, fisher.row_inner)
    )({'kernel': jnp.asarray(b)})['kernel']
    want = np.stack(
      [np.linalg.solve(blocks[j], b[:, j]) for j in range(ROWS)], axis=1
    )
    np.testing.assert_allclose(got, want, rtol=1e-8)

  def test_rows_are_independent(self):
    blocks = spd_blocks(4)
    b = np.random.default_rng(5).normal(size=(D, ROWS))
    b[:, 2] = 0.0  # a zero row must not disturb the others
    got = fo.batched_cg(
      block_matvec(blocks), {'kernel': jnp.asarray(b)}, 3, fisher.row_inner
    )['kernel']
    np.testing.assert_array_equal(got[:, 2], 0.0)
    want = explicit.textbook_cg(blocks[0], b[:, 0], 3)
    np.testing.assert_allclose(got[:, 0], want, rtol=1e-10)

  def test_zero_operator_breakdown_stays_finite(self):
    b = {'kernel': jnp.ones((D, ROWS))}
    got = fo.batched_cg(
      lambda v: jax.tree.map(jnp.zeros_like, v), b, 4, fisher.row_inner
    )
    np.testing.assert_array_equal(got['kernel'], 0.0)

  def test_multi_leaf_rows_share_scalars(self):
    # kernel (3, rows) + bias (rows,) form one D = 4 system per row.
    blocks = spd_blocks(6, d=4)
    a = jnp.asarray(blocks)

    def matvec(v):
      stacked = jnp.concatenate([v['kernel'], v['bias'][None]], axis=0)
      out = jnp.einsum('jde,ej->dj', a, stacked)
      return {'kernel': out[:3], 'bias': out[3]}

    b = np.random.default_rng(7).normal(size=(4, ROWS))
    got = fo.batched_cg(
      matvec,
      {'kernel': jnp.asarray(b[:3]), 'bias': jnp.asarray(b[3])},
      2,
      fisher.row_inner,
    )
    want = np.stack(
      [explicit.textbook_cg(blocks[j], b[:, j], 2) for j in range(ROWS)], axis=1
    )
    np.testing.assert_allclose(got['kernel'], want[:3], rtol=1e-10)
    np.testing.assert_allclose(got['bias'], want[3], rtol=1e-10)


@pytest.mark.parametrize('k', [1, 3])
def test_traced_iteration_count(k):
  # optax.inject_hyperparams turns cg_iters into an array.
  blocks = spd_blocks(8)
  b = {'kernel': jnp.asarray(np.random.default_rng(9).normal(size=(D, ROWS)))}
  got = jax.jit(
    lambda rhs, k: fo.batched_cg(block_matvec(blocks), rhs, k, fisher.row_inner)
  )(b, jnp.int32(k))
  want = fo.batched_cg(block_matvec(blocks), b, k, fisher.row_inner)
  np.testing.assert_allclose(got['kernel'], want['kernel'], rtol=1e-12)


@pytest.mark.parametrize('spec', [LAYERS[0], LAYERS[2]], ids=['dense', 'conv'])
def test_fisher_solve_with_k_equal_d_is_exact(spec):
  # On the real row-wise Fisher operator, D iterations solve F̂_j z_j = m_j.
  # (Damping 0.1 keeps the rows well conditioned: with κ ~ 1e3, CG's lost
  # orthogonality in floating point leaves ~1e-5 after D steps.)
  damping = 0.1
  stats, params, features = make_layer(spec, True)
  rng = np.random.default_rng(11)
  m = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
  d = features.shape[-1]
  op = fo.row_fisher_operator(stats, params, damping, jnp.float64)
  z = fo.batched_cg(op, m, d, fisher.row_inner)
  fishers = explicit.normalized_row_fishers(
    features, stats.output_grads, damping
  )
  rhs = explicit.rows_to_vectors(m['kernel'], m['bias'])
  want = np.stack([np.linalg.solve(f, b) for f, b in zip(fishers, rhs)])
  got = explicit.rows_to_vectors(z['kernel'], z['bias'])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
