"""Explicit Cholesky solves of row systems, rows flattened to `(rows, D)`.

The matrix-free solvers work on `{'kernel', 'bias'?}` dicts directly; the
explicit ones (FROG's exact-solve ablation, FOOF on small layers) flatten
each row to a vector: row `j` is `kernel[..., j]` in C order, then
`bias[j]`, the same column order as `fisher.input_patches`.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from frog_optax._src.geometry import RowParams


def to_matrix(rows: RowParams) -> jax.Array:
  """`{'kernel': (..., r), 'bias'?: (r,)}` → `(r, D)`."""
  kernel = rows['kernel']
  columns = [kernel.reshape(-1, kernel.shape[-1]).T]
  if 'bias' in rows:
    columns.append(rows['bias'][:, None])
  return jnp.concatenate(columns, axis=1)


def from_matrix(matrix: jax.Array, like: RowParams) -> RowParams:
  """The inverse of `to_matrix`, shaped like `like`."""
  kernel_shape = like['kernel'].shape
  row_size = int(np.prod(kernel_shape[:-1]))
  out = {'kernel': matrix[:, :row_size].T.reshape(kernel_shape)}
  if 'bias' in like:
    out['bias'] = matrix[:, row_size]
  return out


def damped_cholesky(matrices: jax.Array, damping) -> jax.Array:
  """Lower Cholesky factors of `matrices + damping·I` (batched)."""
  eye = jnp.eye(matrices.shape[-1], dtype=matrices.dtype)
  return lax.linalg.cholesky(matrices + damping * eye, symmetrize_input=True)


def cholesky_solve(factors: jax.Array, rhs: jax.Array) -> jax.Array:
  """Solves `L Lᵀ z = rhs` with batched factors `(b, D, D)`, rhs `(b, D, r)`."""
  y = lax.linalg.triangular_solve(factors, rhs, left_side=True, lower=True)
  return lax.linalg.triangular_solve(
    factors, y, left_side=True, lower=True, transpose_a=True
  )


def grouped_cholesky_solve(
  factors: jax.Array, direction: RowParams
) -> RowParams:
  """Solves every row with the factor of its feature group.

  `factors` is `(groups, D, D)`; rows are split into `groups` consecutive
  blocks, as Flax orders grouped-convolution output channels.
  """
  matrix = to_matrix(direction)
  groups, row_size, _ = factors.shape
  rhs = matrix.reshape(groups, -1, row_size).transpose(0, 2, 1)
  z = cholesky_solve(factors, rhs).transpose(0, 2, 1).reshape(matrix.shape)
  return from_matrix(z, direction)
