"""FROG's rule for one layer: the damping, the row solve, the step scale.

`precondition_layer` is the public per-layer update; `scale_by_frog` applies
it to every preconditioned layer through the family's shell.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp

from frog_optax._src import aliases
from frog_optax._src import cg as cg_lib
from frog_optax._src import dense_rows
from frog_optax._src import family
from frog_optax._src import fisher
from frog_optax._src import stats as stats_lib
from frog_optax._src import validation

SOLVERS = ('cg', 'cholesky')


def precondition_layer(
  layer_stats: stats_lib.LayerStats,
  direction: dict[str, jax.Array],
  *,
  damping: Any,
  cg_iters: int | jax.Array,
  eps: Any,
  solver: str = 'cg',
  trace_normalization: bool = True,
  step_normalization: bool = True,
  row_blocks: str = 'exact',
) -> dict[str, jax.Array]:
  """FROG's update of one layer: `u_j = z_j / √(⟨z_j, m_j⟩ + ε c_j²)` per row.

  See :func:`solve_layer` (this is its update alone, CG from zero).

  `c_j = max |m_j|`: the solve runs on `m_j / c_j`, so that `u` does not
  depend on the scale of the loss even in float32, and ε is relative. A row
  whose Fisher has zero trace (a dead unit: all its sampled inputs or output
  gradients are zero) is solved with the identity in place of its Fisher,
  so its step is its normalised momentum `m_j / |m_j|` (0 when `m_j = 0`).

  Args:
    layer_stats: the layer's captured statistics.
    direction: `{'kernel', 'bias'?}`, the momentum `m` to precondition.
    damping: τ (a scalar); a negative or NaN value (possible only from a
      schedule or a traced value) makes the update NaN.
    cg_iters: number of CG iterations k (`solver='cg'` only).
    eps: ε in the step normalisation, relative to `max |m_j|²`.
    solver: `'cg'` (k batched CG iterations, FROG) or `'cholesky'` (the
      exact per-row solve; ablation, `rows·D²` memory).
    trace_normalization: divide each row Fisher by `tr(F_j)/D` (FROG).
    step_normalization: divide by `sqrt(⟨z_j, m_j⟩ + ε)` (FROG); `False`
      returns `z` itself.
    row_blocks: `'exact'` row Fishers (FROG) or `'kronecker'` blocks
      `S_jj·A` (ablation: K-FAC's approximation of the same blocks).

  Returns:
    `u` with the structure and dtypes of `direction`.
  """
  u, _ = solve_layer(
    layer_stats,
    direction,
    damping=damping,
    cg_iters=cg_iters,
    eps=eps,
    solver=solver,
    trace_normalization=trace_normalization,
    step_normalization=step_normalization,
    row_blocks=row_blocks,
  )
  return u


def solve_layer(
  layer_stats: stats_lib.LayerStats,
  direction: dict[str, jax.Array],
  *,
  damping: Any,
  cg_iters: int | jax.Array,
  eps: Any,
  solver: str = 'cg',
  trace_normalization: bool = True,
  step_normalization: bool = True,
  row_blocks: str = 'exact',
  init: dict[str, jax.Array] | None = None,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """FROG's update of one layer and the solve `z` behind it.

  `precondition_layer` documents the arguments; `init` (CG only) is the
  start of the CG, in the units of `direction` (e.g. the previous step's
  solution: the momentum changes slowly, so the same `k` iterations go
  further from there).

  Returns:
    `(u, z)`: `u` with the structure and dtypes of `direction`; `z`, the
    CG solution of `F̂ z = direction` in the solve dtype (the start of the
    next step's solve).
  """
  validation.check_choice('solver', solver, SOLVERS)
  validation.check_choice('row_blocks', row_blocks, fisher.ROW_BLOCKS)
  dtype = family.solve_dtype(direction)
  m = {k: v.astype(dtype) for k, v in direction.items()}
  # The solve is linear in m and u is invariant to a positive scale of each
  # row, so each row is brought to max |m_j| = 1 first: ⟨z, m⟩ can then
  # neither overflow (huge loss scales) nor sink below ε (tiny ones), and ε
  # is relative to the row's largest entry squared.
  peaks = fisher.row_peaks(m)
  m = {k: v / peaks for k, v in m.items()}
  damping = aliases.nonnegative_or_nan(damping)
  curvature = dict(
    trace_normalization=trace_normalization, row_blocks=row_blocks
  )
  if solver == 'cholesky':
    fishers = fisher.row_fisher_matrices(layer_stats, m, dtype, **curvature)
    factors = dense_rows.damped_cholesky(fishers, damping)
    rhs = dense_rows.to_matrix(m)[:, :, None]
    z = dense_rows.from_matrix(
      dense_rows.cholesky_solve(factors, rhs)[:, :, 0], m
    )
  else:
    matvec = fisher.row_fisher_operator(
      layer_stats, m, damping, dtype, **curvature
    )
    # The start is brought to the scale of the scaled rows, like `m`.
    start = None if init is None else {k: init[k] / peaks for k in m}
    z = cg_lib.batched_cg(matvec, m, cg_iters, fisher.row_inner, start)
  if step_normalization:
    # ⟨z, m⟩ > 0 in exact arithmetic (CG iterates of a PSD system); clip the
    # rounding so that the square root stays real.
    zm = jnp.maximum(fisher.row_inner(z, m), 0.0)
    scale = jax.lax.rsqrt(zm + eps)
  else:
    scale = peaks
  u = {k: (z[k] * scale).astype(direction[k].dtype) for k in direction}
  return u, {k: z[k] * peaks for k in direction}


class RankDeficientFisherWarning(UserWarning):
  """A preconditioned layer's row Fisher has fewer samples than entries."""


SAFE_RANK_DEFICIENT_DAMPING = 1e-3


def layer_damping(damping, rank_damping: float, row_size: int, samples: int):
  """τ + `rank_damping`·D/n: the damping one layer's row Fishers get.

  A row Fisher estimated from `n` samples in `D` dimensions has rank at most
  `n`; the normalised estimate is shrunk towards its mean eigenvalue (the
  identity) by the ratio D/n, as a sample covariance needs (negligible for
  convolutions, where `n` counts examples × output positions).
  """
  return damping + rank_damping * row_size / max(samples, 1)


def warn_if_rank_deficient(name, row_size, samples, damping, rank_damping):
  """Warns (once per trace: shapes are static) about unprotected rows.

  Only when the automatic `rank_damping` is off and the damping is a
  concrete number below 1e-3; traced values (`inject_hyperparams`) and
  schedules cannot be judged and do not warn.
  """
  concrete = validation.is_concrete_number
  if (
    samples >= row_size
    or not (concrete(damping) and concrete(rank_damping))
    or float(rank_damping) > 0
    or float(damping) >= SAFE_RANK_DEFICIENT_DAMPING
  ):
    return
  warnings.warn(
    f'FROG preconditions {name!r} with a Fisher estimated from {samples}'
    f' samples for rows of D = {row_size} entries: it has rank < D, and'
    ' directions the sample did not see are scaled by 1/damping. Keep the'
    ' default rank_damping, exclude the layer, raise sample_size, or use'
    f' damping >= {SAFE_RANK_DEFICIENT_DAMPING} (got {float(damping)!r}).',
    RankDeficientFisherWarning,
    stacklevel=3,
  )
