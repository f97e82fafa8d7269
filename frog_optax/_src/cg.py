"""Batched conjugate gradient: many independent rows, one operator call.

Differences from `jax.scipy.sparse.linalg.cg`:
- every row j of the unknown (the last axis of each leaf) is its own system,
  with its own step sizes α_j, β_j, but all rows share one matvec call;
- a fixed number of iterations (from zero, or from a given start) and no
  tolerance test, so the cost is static; a Python-int count is unrolled
  (see below), a traced count runs a `fori_loop`;
- breakdown (a zero residual or a zero curvature ⟨p, Ap⟩) is not an error:
  the step size of that row becomes zero and its iterate stays put.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from frog_optax._src import scopes

Tree = Any


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
