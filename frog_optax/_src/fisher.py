"""Per-layer statistics and the row-wise Fisher operator.

For one layer, `X(V)` maps row-stacked weights `V = {'kernel', 'bias'}` to the
pre-activation outputs of the sampled examples, and `Xᵀ(G)` is its transpose
(for a convolution: the weight-gradient convolution); the layer's geometry
provides both (`geometry.py`). All rows share `X`, so

  A(V) = Xᵀ(Λ̂ ⊙ X(V)) + τ V,
  Λ̂[..., j] = y_j² · D / Σ_{n,t} y²_{n,t,j} ‖x_{n,t}‖²

applies every row's damped, trace-normalised Fisher `F_j / (tr F_j / D) + τ I`
in one forward and one transposed layer op. The other
members of the family use the same maps with other weights (a scalar for
`XᵀX`), the diagonals `diag(XᵀX)` and `diag(YᵀY)`, or, for the explicit
solvers, the design matrix itself.

The operators are solved with :func:`batched_cg`: every row its own system,
all rows in one operator call, a fixed number of iterations (from zero or a
given start) and no tolerance test, so the cost is static; a zero residual
or curvature ⟨p, Ap⟩ is not an error (that row's step size becomes zero).
Unlike `jax.scipy.sparse.linalg.cg`, each row has its own step sizes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from frog_optax._src import scopes
from frog_optax._src import stats as stats_lib
from frog_optax._src.geometry import RowParams

Tree = Any


# ----------------------------------------------------------------------------
# The batched conjugate gradient.


def _safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _axpy(alpha: jax.Array, x: Tree, y: Tree) -> Tree:
  """y + α x with a per-row α broadcast over the last axis."""
  return jax.tree.map(lambda a, b: b + alpha * a, x, y)


def batched_cg(
  matvec: Callable[[Tree], Tree],
  rhs: Tree,
  num_iters: int | jax.Array,
  row_inner: Callable[[Tree, Tree], jax.Array],
  init: Tree | None = None,
) -> Tree:
  """Runs `num_iters` conjugate-gradient steps on `A z = rhs`, row by row.

  Args:
    matvec: the symmetric positive semi-definite operator `A`, applied to all
      rows at once.
    rhs: the right-hand side, a tree whose leaves share a last (row) axis.
    num_iters: number of CG steps k; `k = D` solves exactly (in exact
      arithmetic).
    row_inner: per-row inner product of two trees, returning shape `(rows,)`.
    init: the start `z⁽⁰⁾` (structure of `rhs`); `None` starts from zero.
      A start costs one more `matvec` (its residual `rhs - A z⁽⁰⁾`).

  Returns:
    The k-th CG iterate with the structure of `rhs`.

  Example:
    >>> import jax.numpy as jnp, frog_optax as fo
    >>> a = jnp.array([[2.0, 0.0], [0.0, 4.0]])  # one row's system, D = 2
    >>> matvec = lambda v: {'w': a @ v['w']}  # leaves (D, rows=1)
    >>> inner = lambda u, v: (u['w'] * v['w']).sum(axis=0)
    >>> b = {'w': jnp.array([[2.0], [4.0]])}
    >>> fo.batched_cg(matvec, b, 2, inner)['w'].ravel().round(4).tolist()
    [1.0, 1.0]
    >>> start = {'w': jnp.array([[1.0], [0.0]])}  # one CG step from here
    >>> fo.batched_cg(matvec, b, 1, inner, init=start)['w'].ravel().tolist()
    [1.0, 1.0]
  """
  with jax.named_scope(scopes.CG):
    return _batched_cg(matvec, rhs, num_iters, row_inner, init)


def _batched_cg(matvec, rhs, num_iters, row_inner, init):
  if init is None:
    z, r = jax.tree.map(jnp.zeros_like, rhs), rhs
  else:
    z = init
    r = jax.tree.map(jnp.subtract, rhs, matvec(init))
  p = r
  rr = row_inner(r, r)

  def body(_, carry):
    z, r, p, rr = carry
    ap = matvec(p)
    alpha = _safe_ratio(rr, row_inner(p, ap))
    z = _axpy(alpha, p, z)
    r = _axpy(-alpha, ap, r)
    rr_new = row_inner(r, r)
    beta = _safe_ratio(rr_new, rr)
    p = _axpy(beta, p, r)
    return z, r, p, rr_new

  carry = (z, r, p, rr)
  if isinstance(num_iters, (int, np.integer)):
    # Unrolled: XLA:CPU runs convolutions inside a while loop on a much
    # slower path (measured 15x on the example's conv net).
    for i in range(num_iters):
      carry = body(i, carry)
  else:  # traced, e.g. under optax.inject_hyperparams
    carry = jax.lax.fori_loop(0, num_iters, body, carry)
  return carry[0]


# ----------------------------------------------------------------------------
# The row operators.


def row_inner(a: RowParams, b: RowParams) -> jax.Array:
  """Per-row inner products `⟨a_j, b_j⟩`: sums over all axes but the last."""
  total = 0.0
  for name in a:
    prod = a[name] * b[name]
    total = total + prod.reshape(-1, prod.shape[-1]).sum(axis=0)
  return total


def row_dimension(params: RowParams) -> int:
  """D: entries of one row, the bias counted as a homogeneous coordinate."""
  return int(np.prod(params['kernel'].shape[:-1])) + ('bias' in params)


def input_sq_sums(
  layer_stats: stats_lib.LayerStats, params_like: RowParams, dtype: Any
) -> RowParams:
  """diag(XᵀX) of every row, shaped like the parameters.

  Entry `[..., j]` is Σ_{n,t} x² over the inputs that multiply it (the bias
  entry counts the (example, location) pairs): one weight-gradient
  convolution of the squared inputs against all-ones output cotangents.
  """
  geometry = layer_stats.geometry
  sq = jnp.square(layer_stats.inputs.astype(dtype))
  struct = {
    k: jax.ShapeDtypeStruct(v.shape, dtype) for k, v in params_like.items()
  }
  ones = jnp.ones(layer_stats.output_grads.shape, dtype)
  return geometry.transpose(sq, struct)(ones)


def output_sq_sums(layer_stats: stats_lib.LayerStats, dtype: Any) -> jax.Array:
  """diag(YᵀY): Σ_{n,t} y²_{n,t,j} per row, shape `(rows,)`."""
  dy = layer_stats.output_grads.astype(dtype)
  return jnp.square(dy).reshape(-1, dy.shape[-1]).sum(axis=0)


def weighted_gram_operator(
  layer_stats: stats_lib.LayerStats,
  params_like: RowParams,
  weights: jax.Array | float,
  damping: Any,
  dtype: Any,
) -> Callable[[RowParams], RowParams]:
  """`V ↦ Xᵀ(weights ⊙ X(V)) + damping·V` on all rows at once.

  `weights` broadcasts against the layer outputs: a scalar gives the
  row-independent `XᵀX` (FOOF, K-FROG), an output-shaped array gives each
  row its own weighting of the samples (FROG's row Fishers). `damping` is a
  scalar or one value per row.
  """
  geometry = layer_stats.geometry
  inputs = layer_stats.inputs.astype(dtype)
  params_struct = {
    k: jax.ShapeDtypeStruct(v.shape, dtype) for k, v in params_like.items()
  }
  transpose = geometry.transpose(inputs, params_struct)

  def matvec(v: RowParams) -> RowParams:
    gram_v = transpose(weights * geometry.forward(inputs, v))
    # A per-row damping `(rows,)` broadcasts over the last (row) axis.
    return {k: gram_v[k] + damping * v[k] for k in v}

  return matvec


def input_gram_cg(
  layer_stats: stats_lib.LayerStats,
  rhs: RowParams,
  damping: Any,
  cg_iters: int | jax.Array,
) -> RowParams:
  """`cg_iters` batched CG steps on `(XᵀX/N + damping·I) z = rhs`, all rows.

  The input side of FOOF and K-FROG. `rhs` must already be in the solve
  dtype.
  """
  dtype = rhs['kernel'].dtype
  matvec = weighted_gram_operator(
    layer_stats, rhs, 1.0 / layer_stats.inputs.shape[0], damping, dtype
  )
  return batched_cg(matvec, rhs, cg_iters, row_inner)


ROW_BLOCKS = ('exact', 'kronecker')


def row_peaks(tree: RowParams | jax.Array) -> jax.Array:
  """max |entry| of every row (the last axis), 1 where a row is all zero.

  Dividing a row by its peak brings it to [-1, 1] without changing its
  direction: FROG's weights and steps are invariant to a positive per-row
  scale, so this keeps squares and inner products away from float32
  overflow (huge loss scales) and underflow (tiny ones).
  """
  leaves = jax.tree.leaves(tree)
  rows = leaves[0].shape[-1]
  peak = jnp.max(
    jnp.stack([jnp.abs(v).reshape(-1, rows).max(axis=0) for v in leaves]),
    axis=0,
  )
  return jnp.where(peak > 0, peak, jnp.ones_like(peak))


class RowCurvature(NamedTuple):
  """Per-sample weights of the row Fishers, and the rows without curvature.

  Attributes:
    weights: Λ, broadcasting against the layer outputs, with
      `F_j = Xᵀ diag(Λ_{·,j}) X`.
    identity_rows: `(rows,)`, 1 where the row's normalised Fisher is replaced
      by the identity (its trace is zero: a dead unit, or all-zero inputs or
      output gradients in the sample), 0 elsewhere.
  """

  weights: jax.Array
  identity_rows: jax.Array | float


def row_curvature(
  layer_stats: stats_lib.LayerStats,
  params_like: RowParams,
  dtype: Any,
  *,
  trace_normalization: bool = True,
  row_blocks: str = 'exact',
) -> RowCurvature:
  """Per-sample weights Λ of the row Fishers `F_j = Xᵀ diag(Λ_{·,j}) X`.

  `'exact'` row blocks weight sample (n, t) of row j by y²_{n,t,j}/s;
  `'kronecker'` replaces y² by its mean over the samples (K-FAC's block
  `S_jj·A`). With `trace_normalization` the weights are divided by
  `tr(F_j)/D`, so each row Fisher has mean eigenvalue 1; then each row's
  output gradients are first divided by their largest magnitude (the result
  does not depend on it, and y² cannot overflow or underflow), and a row
  whose trace is zero gets the identity, the mean eigenvalue of every other
  row, so that its step is its normalised momentum instead of 0/0.
  """
  output_grads = layer_stats.output_grads.astype(dtype)
  num_rows = output_grads.shape[-1]
  if trace_normalization:
    output_grads = output_grads / row_peaks(output_grads)
  dy_sq = jnp.square(output_grads)
  if row_blocks == 'kronecker':
    mean = dy_sq.reshape(-1, num_rows).mean(axis=0)
    dy_sq = jnp.broadcast_to(mean, dy_sq.shape)
  if not trace_normalization:
    return RowCurvature(dy_sq / layer_stats.inputs.shape[0], 0.0)
  norms = layer_stats.geometry.patch_sq_norms(
    layer_stats.inputs.astype(dtype),
    params_like['kernel'].shape,
    'bias' in params_like,
  )
  weighted = (dy_sq * norms).reshape(-1, num_rows).sum(axis=0)
  # tr(F_j)/D up to the common 1/s, which cancels here.
  trace_per_dim = weighted / row_dimension(params_like)
  flat = trace_per_dim <= 0
  safe_trace = jnp.where(flat, jnp.ones_like(trace_per_dim), trace_per_dim)
  weights = jnp.where(flat, 0.0, dy_sq / safe_trace)
  return RowCurvature(weights, flat.astype(dtype))


class RowFisherOperator:
  """The damped, trace-normalised row Fishers of one layer, as one operator.

  `mv(V)` applies every row's `F̂_j + τ_j I` at once, matrix-free (what CG
  needs; the operator is also callable as `op(V)`); `as_matrix()` gives the
  same matrices explicitly as `(rows, D, D)`, in the column order of
  `cholesky.to_matrix` (what an exact solve of a small layer needs). A row
  whose Fisher has zero trace (a dead unit) holds the identity in place of
  its normalised Fisher (see :func:`row_curvature`).
  """

  def __init__(self, layer_stats, params_like, damping, dtype, curvature):
    self.layer_stats = layer_stats
    self.params_like = params_like
    self.dtype = dtype
    with jax.named_scope(scopes.CURVATURE):
      self.weights, identity_rows = row_curvature(
        layer_stats, params_like, dtype, **curvature
      )
    self.damping = damping + identity_rows  # scalar or (rows,)

  @functools.cached_property
  def _matvec(self) -> Callable[[RowParams], RowParams]:
    return weighted_gram_operator(
      self.layer_stats, self.params_like, self.weights, self.damping, self.dtype
    )

  def mv(self, v: RowParams) -> RowParams:
    """`(F̂_j + τ_j I) v_j` for every row `j` of `v`."""
    return self._matvec(v)

  __call__ = mv

  def as_matrix(self) -> jax.Array:
    """The damped row Fishers, `(rows, D, D)`."""
    stats = self.layer_stats
    kernel_shape = self.params_like['kernel'].shape
    patches = stats.geometry.patches(
      stats.inputs.astype(self.dtype), kernel_shape, 'bias' in self.params_like
    )
    groups, _, row_size = patches.shape
    num_rows = kernel_shape[-1]
    weights = jnp.broadcast_to(self.weights, stats.output_grads.shape)
    weights = weights.reshape(-1, groups, num_rows // groups)
    with jax.named_scope(scopes.CURVATURE):
      blocks = jnp.einsum('gtd,tgr,gte->grde', patches, weights, patches)
    blocks = blocks.reshape(num_rows, row_size, row_size)
    damping = jnp.broadcast_to(
      jnp.asarray(self.damping, blocks.dtype), (num_rows,)
    )
    eye = jnp.eye(row_size, dtype=blocks.dtype)
    return blocks + damping[:, None, None] * eye


def row_fisher_operator(
  layer_stats: stats_lib.LayerStats,
  params_like: RowParams,
  damping: Any,
  dtype: Any,
  *,
  trace_normalization: bool = True,
  row_blocks: str = 'exact',
) -> RowFisherOperator:
  """The damped, trace-normalised row-wise Fisher `A(V)` of one layer.

  A row whose Fisher has zero trace (a dead unit) gets the identity in place
  of its normalised Fisher (see :func:`row_curvature`).

  Args:
    layer_stats: captured inputs and output gradients of the layer.
    params_like: the layer's `{'kernel', 'bias'?}` (shapes only are used).
    damping: τ, relative to the mean Fisher eigenvalue: a scalar, or one
      value per row (shape `(rows,)`).
    dtype: the solve dtype; statistics are cast to it.
    trace_normalization: divide each row Fisher by `tr(F_j)/D` (FROG);
      `False` is an ablation (τ is then absolute).
    row_blocks: `'exact'` (FROG) or `'kronecker'` (the ablation `S_jj·A`).

  Returns:
    A linear operator on `{'kernel', 'bias'?}` dicts of the same shapes:
    call it (or its `mv`) on one, or take all rows' matrices with
    `as_matrix()`.

  Example:
    >>> import jax.numpy as jnp, frog_optax as fo
    >>> stats = fo.LayerStats(inputs=jnp.eye(3), output_grads=jnp.ones((3, 2)),
    ...                       geometry=fo.DenseGeometry())
    >>> params = {'kernel': jnp.zeros((3, 2))}
    >>> op = fo.row_fisher_operator(stats, params, 0.5, jnp.float32)
    >>> v = {'kernel': jnp.ones((3, 2))}
    >>> op.as_matrix().shape, op(v)['kernel'][0].tolist()
    ((2, 3, 3), [1.5, 1.5])
  """
  return RowFisherOperator(
    layer_stats,
    params_like,
    damping,
    dtype,
    dict(trace_normalization=trace_normalization, row_blocks=row_blocks),
  )
