"""FROG whole: its per-layer rule, `scale_by_frog` and the `frog` alias.

FROG is one member of the family built on `family.scale_by_row_preconditioner`
(routing, stats checks and state are shared). This module holds the rule of
one layer (`precondition_layer`: the damping, the row solve, the step scale),
its ablation switches and the optimizer alias; the curvature it solves with
is the family's row Fisher (`fisher.py`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from frog_optax._src import aliases
from frog_optax._src import cholesky
from frog_optax._src import family
from frog_optax._src import fisher
from frog_optax._src import stats as stats_lib
from frog_optax._src import validation

ScaleByFrogState = family.RowPreconditionerState

# ----------------------------------------------------------------------------
# One layer.

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
  damping = validation.nonnegative_or_nan(damping)
  curvature = dict(
    trace_normalization=trace_normalization, row_blocks=row_blocks
  )
  operator = fisher.row_fisher_operator(
    layer_stats, m, damping, dtype, **curvature
  )
  if solver == 'cholesky':
    factors = cholesky.damped_cholesky(operator.as_matrix(), 0.0)
    rhs = cholesky.to_matrix(m)[:, :, None]
    z = cholesky.from_matrix(cholesky.cholesky_solve(factors, rhs)[:, :, 0], m)
  else:
    # The start is brought to the scale of the scaled rows, like `m`.
    start = None if init is None else {k: init[k] / peaks for k in m}
    z = fisher.batched_cg(operator.mv, m, cg_iters, fisher.row_inner, start)
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


# ----------------------------------------------------------------------------
# Every layer: the transformation and the alias.


def scale_by_frog(
  damping: optax.ScalarOrSchedule = 1e-3,
  cg_iters: int = 4,
  eps: float = 1e-10,
  *,
  rank_damping: float = 1.0,
  layouts: Any = None,
  solver: str = 'cg',
  trace_normalization: bool = True,
  step_normalization: bool = True,
  row_blocks: str = 'exact',
  warm_start: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""FROG's preconditioning step alone: no momentum, decay or learning rate.

  For every output row `j` of each preconditioned layer it solves
  `(F_j/(tr F_j/D) + τ_ℓ I) z_j = g_j` with `k` CG iterations and returns
  `u_j = z_j / √(⟨z_j, g_j⟩ + ε c_j²)`; the math, the per-layer damping
  `τ_ℓ` and the treatment of dead rows are written once, in :func:`frog`.
  Give it momentum (or any direction) as `g`.

  Leaves of modules that are not Dense/Conv-like (see
  :func:`preconditioned_modules`) pass through unchanged; a preconditioned
  module without stats is an error. Excluding layers is the alias's
  routing (:func:`frog`).

  The keyword-only switches are ablations for benchmarks; their defaults are
  FROG.

  Args:
    damping: τ, relative to the mean eigenvalue of the normalised Fisher
      (which is 1). A float or an optax schedule of the step count (a
      schedule is checked at its first steps; a negative or NaN value at a
      later step makes that step's update NaN). Default 1e-3.
    cg_iters: number of CG iterations k (3-5 recommended); used by
      `solver='cg'` only.
    eps: ε guarding the step normalisation, relative to `max |g_j|²`; must
      be > 0.
    rank_damping: ρ_rank >= 0, the weight of the `D/n` shrinkage (default
      1.0). 0 restores a damping of τ alone (the reference), which diverges
      on rank-deficient layers unless τ is large; then a
      :class:`frog_optax.RankDeficientFisherWarning` names such layers.
    layouts: needed only with `warm_start` (the state it keeps per layer is
      row-stacked), for DenseGeneral, Einsum and scan-stacked layers: see
      :func:`scale_by_row_preconditioner`. Without `warm_start` FROG keeps
      no per-layer state and reads each layer's layout from its stats.
    solver: `'cg'` or `'cholesky'` (exact per-row solve, `rows·D²` memory:
      small layers only).
    trace_normalization: `False` drops the `tr(F_j)/D` normalisation, so τ
      becomes absolute and `F_j = Σ y² x xᵀ / N` (N = leading axis of the
      captured inputs).
    step_normalization: `False` returns `z` instead of `z/√⟨z, g⟩`.
    row_blocks: `'kronecker'` replaces each row's `y²` weights by their
      mean, giving K-FAC's block `S_jj·A` instead of the exact row Fisher.
    warm_start: start each step's CG from the previous step's solution `z`
      (kept in the state, one copy of every preconditioned kernel) instead
      of zero. Each solve then costs one more operator application (the
      start's residual); `solver='cg'` only.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose `update` requires the
    keyword argument `frog_stats` (see :func:`frog_optax.linen.value_and_grad`).

  Example:
    >>> import jax.numpy as jnp, frog_optax as fo
    >>> params = {'Dense_0': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}}
    >>> stats = {'Dense_0': fo.LayerStats(
    ...     inputs=jnp.arange(12.).reshape(4, 3),
    ...     output_grads=jnp.ones((4, 2)), geometry=fo.DenseGeometry())}
    >>> tx = fo.scale_by_frog(cg_iters=4)
    >>> u, _ = tx.update(params, tx.init(params), frog_stats=stats)
    >>> u['Dense_0']['kernel'].shape
    (3, 2)
  """
  validation.check_range('damping', damping, low=0.0, allow_schedule=True)
  validation.check_range('rank_damping', rank_damping, low=0.0)
  validation.check_cg_iters(cg_iters)
  validation.check_range('eps', eps, low=0.0, low_inclusive=False)
  validation.check_choice('solver', solver, SOLVERS)
  validation.check_bool('trace_normalization', trace_normalization)
  validation.check_bool('step_normalization', step_normalization)
  validation.check_choice('row_blocks', row_blocks, fisher.ROW_BLOCKS)
  validation.check_bool('warm_start', warm_start)
  if warm_start and solver != 'cg':
    raise ValueError(
      f"warm_start needs solver='cg' (it starts the CG); got {solver!r}."
    )

  def init_layer(leaves):
    if not warm_start:
      return None
    dtype = family.solve_dtype(leaves)
    return {k: jnp.zeros(v.shape, dtype) for k, v in leaves.items()}

  def update_layer(name, layer_stats, direction, state, count):
    row_size = fisher.row_dimension(direction)
    samples = layer_stats.num_samples
    warn_if_rank_deficient(name, row_size, samples, damping, rank_damping)
    tau = validation.nonnegative_or_nan(
      validation.schedule_value(damping, count)
    )
    u, z = solve_layer(
      layer_stats,
      direction,
      damping=layer_damping(tau, rank_damping, row_size, samples),
      cg_iters=cg_iters,
      eps=eps,
      solver=solver,
      trace_normalization=trace_normalization,
      step_normalization=step_normalization,
      row_blocks=row_blocks,
      init=state,
    )
    return u, (z if warm_start else None)

  return family.scale_by_row_preconditioner(
    family.LayerPreconditioner(init=init_layer, update=update_layer),
    layouts,
  )


def frog(
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: float = 0.9,
  nesterov: bool = False,
  weight_decay: float = 0.0,
  weight_decay_mask: Any = None,
  damping: optax.ScalarOrSchedule = 1e-3,
  rank_damping: float = 1.0,
  cg_iters: int = 4,
  exclude: str | Sequence[str] = (),
  fallback: optax.GradientTransformation | None = None,
  other_lr_ratio: float | None = None,
  eps: float = 1e-10,
  mu_dtype: Any = None,
  solver: str = 'cg',
  trace_normalization: bool = True,
  step_normalization: bool = True,
  row_blocks: str = 'exact',
  warm_start: bool = False,
  layouts: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""FROG: Fisher row-wise preconditioning (Breskanu), as an optax optimizer.

  For each preconditioned row `j` (a Dense unit or Conv channel):

  .. math::
    m_t = \beta m_{t-1} + g_t, \quad
    z_j = \mathrm{CG}_k(F_j/(\operatorname{tr}F_j/D) + \tau_\ell I,\ m_j),
    \quad
    \theta_j \leftarrow (1-\eta\rho)\theta_j - \eta\, z_j /
      \sqrt{\langle z_j, m_j\rangle + \epsilon c_j^2},

  where `F_j` is the empirical Fisher of row `j` (its bias a homogeneous
  coordinate) estimated from the captured sample, `c_j = max |m_j|`, and the
  layer's damping is

  .. math::
    \tau_\ell = \tau + \rho_{\mathrm{rank}} \cdot D / n

  with `n` the (example, output position) samples behind each row Fisher
  and `D` the row size. Its Fisher has rank at most `n`; the `D/n` term
  shrinks it towards its mean eigenvalue as a covariance estimated from `n`
  samples in `D` dimensions needs, so directions the sample did not see are
  not scaled by `1/τ` (negligible for convolutions, where `n ≫ D`; decisive
  for a Dense layer on a flattened feature map, where `D ≫ n`).

  The step is invariant to the scale of the loss, also in float32 (from
  1e-5 to 1e30 loss scales): output gradients and `m_j` are divided by their
  largest entry per row before they are squared, which changes nothing else.
  A row whose Fisher has zero trace (a dead unit: its sampled inputs or
  output gradients are all zero) is solved with the identity, so it moves
  along its normalised direction `m_j / |m_j|` (0 when `m_j = 0`).

  Every row moves a fixed Fisher distance η per step, whatever the gradient
  or loss scale, so the learning-rate schedule controls convergence.
  Parameters FROG does not precondition (BatchNorm, embeddings, excluded
  layers) go to `fallback`. With the default damping rule, every captured
  layer can be preconditioned, classifier heads included.

  A NaN or infinite gradient entry makes its row's update non-finite for
  that step (the row is solved as one system); with `momentum=0` nothing
  carries over to later steps. :func:`frog_optax.apply_if_finite` skips
  steps whose gradients, stats or updates are not finite.

  Args:
    learning_rate: η, a float or an optax schedule; a good start is 0.1
      with a decaying schedule. η is a per-row Fisher distance, not an SGD
      step: on small conv nets, ResNets with BatchNorm and MLPs the best
      rate was at or below the best momentum-SGD rate of the same model,
      never above it.
    momentum: heavy-ball momentum β in [0, 1) (like `optax.trace`). The
      reference defaults to 0; 0.9 is what its CIFAR-10 runs used.
    nesterov: use `g + β m` instead of `m`.
    weight_decay: ρ >= 0, decoupled for preconditioned rows.
    weight_decay_mask: optional mask (tree or callable) selecting the
      parameters that decay, as in `optax.add_decayed_weights`.
    damping: τ >= 0 relative to the mean Fisher eigenvalue; float or schedule.
      Default 1e-3.
    rank_damping: weight of the per-layer `D/n` damping (default 1.0; 0 =
      τ alone, as the reference, which diverges on rank-deficient layers
      such as a Dense layer after a flatten).
    cg_iters: CG iterations k >= 1 (3-5 recommended; more fits noise). A
      Python int is unrolled; under `optax.inject_hyperparams` pass
      `static_args=('cg_iters',)` to keep it so (a traced count runs a
      `fori_loop`, which XLA:CPU executes several times slower).
    exclude: module paths ('/'-joined, e.g. `('head', 'block3/Dense_0')`)
      sent to the fallback even when captured.
    fallback: optax transformation for parameters FROG does not precondition.
      Default: momentum SGD at `learning_rate * other_lr_ratio` with coupled
      weight decay, as the reference does.
    other_lr_ratio: learning-rate ratio of the default fallback (default
      0.25); not allowed together with `fallback`. It suits normalisation
      parameters; an excluded classifier head learns faster with an
      adaptive `fallback` such as `optax.adamw`.
    eps: ε > 0 in the step normalisation, relative to `max |m_j|²`.
    mu_dtype: dtype of the momentum buffers (default: the parameter dtype);
      updates are returned in the parameter dtypes either way.
    solver: `'cg'` (FROG) or `'cholesky'` (ablation: exact per-row solve).
    trace_normalization: ablation switch, see :func:`scale_by_frog`.
    step_normalization: ablation switch, see :func:`scale_by_frog`.
    row_blocks: `'exact'` (FROG) or `'kronecker'` (ablation), see
      :func:`scale_by_frog`.
    warm_start: start each CG from the previous step's solution (state:
      one copy of the preconditioned kernels), see :func:`scale_by_frog`.
    layouts: with `warm_start` only, for DenseGeneral, Einsum and
      scan-stacked layers (e.g. `fo.linen.layouts(loss_fn, params, x)`).

  Returns:
    An `optax.GradientTransformationExtraArgs`; `update` requires the keyword
    argument `frog_stats`.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
    >>> import frog_optax as fo
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    >>> x, y = jnp.ones((16, 4)), jnp.zeros(16, jnp.int32)
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> apply_fn = fo.linen.capture(model.apply)
    >>> def loss_fn(params, x, y):
    ...   logits = apply_fn({'params': params}, x)
    ...   return optax.softmax_cross_entropy_with_integer_labels(
    ...       logits, y).mean()
    >>> tx = fo.frog(0.01, exclude=('layers_2',))
    >>> opt_state = tx.init(params)
    >>> vg = fo.linen.value_and_grad(loss_fn, sample_size=8)
    >>> loss, grads, stats = vg(params, x, y)
    >>> updates, opt_state = tx.update(grads, opt_state, params,
    ...                                frog_stats=stats)
    >>> params = optax.apply_updates(params, updates)

    An ablation for benchmarks, e.g. the exact per-row solve:

    >>> exact = fo.frog(0.01, exclude=('layers_2',), solver='cholesky')

  References:
    Breskanu, FROG: Fisher ROw-wise preconditioninG,
    https://github.com/Fullfix/frog-optimizer
  """
  # `exclude` is applied by the routing alone: excluded layers never reach
  # scale_by_frog.
  return aliases.heavy_ball_optimizer(
    scale_by_frog(
      damping=damping,
      rank_damping=rank_damping,
      cg_iters=cg_iters,
      eps=eps,
      solver=solver,
      trace_normalization=trace_normalization,
      step_normalization=step_normalization,
      row_blocks=row_blocks,
      warm_start=warm_start,
      layouts=layouts,
    ),
    learning_rate,
    momentum=momentum,
    nesterov=nesterov,
    weight_decay=weight_decay,
    weight_decay_mask=weight_decay_mask,
    exclude=exclude,
    fallback=fallback,
    other_lr_ratio=other_lr_ratio,
    default_other_lr_ratio=0.25,
    mu_dtype=mu_dtype,
    layouts=layouts,
  )
